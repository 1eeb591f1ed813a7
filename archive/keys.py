"""Ed25519 signing keys: generate, load safely, fingerprint.

The private key is written 0600 (OpenSSH format by default, PKCS#8 PEM on request,
optionally passphrase-encrypted) and refused when group or others can read it, the
way ssh refuses an unprotected identity file. The public key is kept in OpenSSH
form (`ssh-ed25519 AAAA... comment`) so it can be published like an SSH key; its
fingerprint (`SHA256:...`, as `ssh-keygen -l` prints it) is the DSSE key id.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sasgate.errors import KeyFileError

PRIVATE_NAME = "sasgate_ed25519"
PUBLIC_NAME = PRIVATE_NAME + ".pub"
PASSPHRASE_ENV = "SASGATE_KEY_PASSPHRASE"
KeyFormat = Literal["openssh", "pem"]
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-{5}")  # written so this file does not match


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    public_openssh: str
    fingerprint: str


def openssh_public(key: Ed25519PublicKey, comment: str = "") -> str:
    """`ssh-ed25519 AAAA... comment`: the form GitHub and authorized_keys use."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".rstrip()


def fingerprint(key: Ed25519PublicKey) -> str:
    """`SHA256:<base64, unpadded>` of the SSH wire blob, identical to `ssh-keygen -l -E sha256`."""
    blob = base64.b64decode(openssh_public(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def raw_public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def looks_like_private_key(data: bytes) -> bool:
    """True when bytes hold a PEM or OpenSSH private key block (export refuses to bundle one)."""
    return _PRIVATE_KEY.search(data) is not None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet: temp file with `mode`, then link (fails if path exists)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def generate(out_dir: str | os.PathLike, passphrase: bytes | None = None, fmt: KeyFormat = "openssh",
             comment: str = "sasgate") -> KeyPair:
    """Make an Ed25519 key pair in out_dir (created 0700); never overwrites an existing key."""
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    private_format = serialization.PrivateFormat.OpenSSH if fmt == "openssh" else serialization.PrivateFormat.PKCS8
    pem = private.private_bytes(serialization.Encoding.PEM, private_format, encryption)
    pub_line = openssh_public(private.public_key(), comment)
    priv_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    for p in (priv_path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p} already exists; refusing to overwrite a key")
    _write_new(priv_path, pem, 0o600)
    _write_new(pub_path, (pub_line + "\n").encode(), 0o644)
    return KeyPair(priv_path, pub_path, pub_line, fingerprint(private.public_key()))


def check_private_mode(path: Path) -> None:
    """Refuse a private key that group or others may read or write (as ssh does)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"private key {path} has mode {mode:04o}: readable by group/others; run `chmod 600 {path}`")


def is_encrypted(path: str | os.PathLike) -> bool:
    """Whether loading the key needs a passphrase (so the CLI knows to ask for one)."""
    try:
        load_private(path, None)
    except KeyFileError as exc:
        return "passphrase-protected" in str(exc)
    return False


def load_private(path: str | os.PathLike, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (OpenSSH or PEM), after the file-mode check."""
    path = Path(path)
    try:
        check_private_mode(path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"private key {path} not found") from None
    except IsADirectoryError:
        raise KeyFileError(f"private key {path} is a directory") from None
    try:
        key = _parse(data, passphrase)
    except TypeError as exc:  # cryptography: encrypted without a password, or a password for a plain key
        if "not encrypted" in str(exc):
            key = _parse(data, None)
        else:
            raise KeyFileError(
                f"private key {path} is passphrase-protected: give --passphrase-file or set {PASSPHRASE_ENV}"
            ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        what = "wrong passphrase or not a private key" if passphrase else "not a PEM or OpenSSH private key"
        raise KeyFileError(f"cannot load private key {path}: {what} ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path} is {type(key).__name__}, not Ed25519")
    return key


def _parse(data: bytes, passphrase: bytes | None) -> object:
    if b"OPENSSH PRIVATE KEY" in data:
        return serialization.load_ssh_private_key(data, passphrase)
    return serialization.load_pem_private_key(data, passphrase)


def load_public(path: str | os.PathLike) -> Ed25519PublicKey:
    """An Ed25519 public key from an OpenSSH line (`ssh-ed25519 ...`) or a PEM SubjectPublicKeyInfo.

    Raises ValueError with a plain message (the CLI turns it into a usage error).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read public key {path}: {exc.strerror}") from None
    if looks_like_private_key(data):
        raise ValueError(f"{path} holds a private key; give the public key (.pub)")
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip().splitlines()[0])
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm, IndexError) as exc:
        raise ValueError(f"{path} is not an OpenSSH or PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public key {path} is {type(key).__name__}, not Ed25519")
    return key


def read_passphrase(passphrase_file: str | os.PathLike | None) -> bytes | None:
    """The passphrase from a file (first line) or $SASGATE_KEY_PASSPHRASE; None when neither is set."""
    if passphrase_file is not None:
        try:
            text = Path(passphrase_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"cannot read passphrase file {passphrase_file}: {exc.strerror}") from None
        line = text.splitlines()[0] if text else ""
        if not line:
            raise KeyFileError(f"passphrase file {passphrase_file} is empty")
        return line.encode()
    env = os.environ.get(PASSPHRASE_ENV)
    return env.encode() if env else None
