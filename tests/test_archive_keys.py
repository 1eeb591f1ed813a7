"""Ed25519 keys for signing bundles: generation, file modes, passphrases, public key forms."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sasgate.archive import keys
from sasgate.cli import main
from sasgate.errors import KeyFileError


def test_fingerprint_and_openssh_line_match_ssh_keygen_known_answer():
    # `ssh-keygen -lf` on this public key prints SHA256:lbmsoA0y... (checked once with OpenSSH 9)
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    assert keys.openssh_public(key, "kat") == \
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4 kat"
    assert keys.fingerprint(key) == "SHA256:lbmsoA0yIEcEiVDRnMWuzm+nV+3ZEEpVIURqFoeSspg"


def test_keygen_writes_private_0600_and_public_openssh(tmp_path):
    kp = keys.generate(tmp_path / "k")
    assert stat.S_IMODE(kp.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    line = kp.public_path.read_text().strip()
    assert line == kp.public_openssh and line.startswith("ssh-ed25519 ")
    private = keys.load_private(kp.private_path)
    assert keys.fingerprint(keys.load_public(kp.public_path)) == keys.fingerprint(private.public_key()) == kp.fingerprint
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [keys.PRIVATE_NAME, keys.PUBLIC_NAME]


def test_keygen_never_overwrites(tmp_path):
    kp = keys.generate(tmp_path)
    before = kp.private_path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        keys.generate(tmp_path)
    assert kp.private_path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_private_key_readable_by_others_is_refused(tmp_path, mode):
    kp = keys.generate(tmp_path)
    os.chmod(kp.private_path, mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}.*chmod 600"):
        keys.load_private(kp.private_path)


def test_cli_export_refuses_0644_key_with_exit_21(tmp_path):
    kp = keys.generate(tmp_path / "k")
    os.chmod(kp.private_path, 0o644)
    res = CliRunner().invoke(main, ["archive", "export", "--key", str(kp.private_path), "--out",
                                    str(tmp_path / "b.tar.gz"), "--root", str(tmp_path)])
    assert res.exit_code == 21, res.output
    assert "readable by group/others" in res.output
    assert not (tmp_path / "b.tar.gz").exists()


@pytest.mark.parametrize("fmt", ["openssh", "pem"])
def test_passphrase_protected_keys(tmp_path, fmt):
    kp = keys.generate(tmp_path, passphrase=b"correct horse", fmt=fmt)
    assert keys.is_encrypted(kp.private_path)
    with pytest.raises(KeyFileError, match="passphrase-protected"):
        keys.load_private(kp.private_path)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        keys.load_private(kp.private_path, b"wrong")
    assert keys.fingerprint(keys.load_private(kp.private_path, b"correct horse").public_key()) == kp.fingerprint


def test_passphrase_from_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(keys.PASSPHRASE_ENV, raising=False)
    assert keys.read_passphrase(None) is None
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "from env")
    assert keys.read_passphrase(None) == b"from env"
    f = tmp_path / "pw"
    f.write_text("from file\nignored\n")
    assert keys.read_passphrase(f) == b"from file"
    f.write_text("")
    with pytest.raises(KeyFileError, match="empty"):
        keys.read_passphrase(f)


def test_cli_keygen_json_and_encrypted(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    res = CliRunner().invoke(main, ["archive", "keygen", "--out", str(tmp_path / "k"), "--passphrase-file", str(pw),
                                    "--comment", "alice@lab", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["openssh"].endswith(" alice@lab") and out["fingerprint"].startswith("SHA256:")
    assert keys.is_encrypted(out["private_key"])
    res = CliRunner().invoke(main, ["archive", "keygen", "--out", str(tmp_path / "k")])
    assert res.exit_code == 21 and "already exists" in res.output


def test_public_key_loading_rejects_private_and_non_ed25519(tmp_path):
    kp = keys.generate(tmp_path / "k")
    with pytest.raises(ValueError, match="holds a private key"):
        keys.load_public(kp.private_path)
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    p = tmp_path / "rsa.pub"
    p.write_bytes(rsa_pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(ValueError, match="not Ed25519"):
        keys.load_public(p)
    pem = tmp_path / "ed.pem"
    pem.write_bytes(keys.load_private(kp.private_path).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert keys.fingerprint(keys.load_public(pem)) == kp.fingerprint


def test_private_key_blocks_are_recognised():
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    for fmt in (serialization.PrivateFormat.OpenSSH, serialization.PrivateFormat.PKCS8):
        pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
        assert keys.looks_like_private_key(b"prefix " + pem)
    assert not keys.looks_like_private_key(keys.openssh_public(key.public_key()).encode())
