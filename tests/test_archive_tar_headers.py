"""The tar header rule: verify reads only headers every tar reader reads alike (ARCHITECTURE.md, "The archive contract").

Python's tarfile joins a header's ustar `prefix` to its name under any magic; GNU tar only under
POSIX ustar magic. A member re-headered with old-GNU or v7 magic therefore has one name for
`verify` and another for `tar -xzf`: the tree that verified is not the tree on disk. Each attack
below is first shown to make GNU tar read another name (or the same one only by luck), then refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from sasgate.archive import bundle
from sasgate.archive.safe_extract import extract_to, iter_members
from sasgate.errors import NotVerifiedError

GNU_TAR = shutil.which("tar")
needs_tar = pytest.mark.skipif(
    GNU_TAR is None or "GNU tar" not in subprocess.run([GNU_TAR or "tar", "--version"], capture_output=True,
                                                       text=True).stdout, reason="GNU tar not installed")
LONG_DIR, LONG_FILE = "d" * 70, "f" * 70 + ".json"  # 141 characters: ustar must split it into prefix + name
LONG = f"{LONG_DIR}/{LONG_FILE}"
ZEROS = b"\0" * (2 * tarfile.BLOCKSIZE)  # the end-of-archive marker


def block(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def header(name: str, size: int, fmt: int = tarfile.USTAR_FORMAT, **attrs) -> bytearray:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    for k, v in attrs.items():
        setattr(ti, k, v)
    return bytearray(ti.tobuf(fmt, "utf-8", "surrogateescape"))


def rechecksum(buf: bytearray, at: int = 0) -> bytearray:
    """Recompute the checksum of the 512-byte header block starting at `at` (after an edit)."""
    buf[at + 148:at + 156] = b"%06o\0 " % tarfile.calc_chksums(bytes(buf[at:at + 512]))[0]
    return buf


def with_magic(buf: bytearray, magic: bytes) -> bytearray:
    buf[257:265] = magic
    return rechecksum(buf)


def archive(*members: tuple[bytes, bytes], path: Path) -> Path:
    raw = b"".join(bytes(h) + block(d) for h, d in members) + b"\0" * (2 * tarfile.BLOCKSIZE)
    path.write_bytes(gzip.compress(raw, mtime=0))
    return path


def python_names(path: Path) -> list[str]:
    with tarfile.open(path) as tf:  # plain tarfile, as the old verify read it
        return tf.getnames()


def gnu_names(path: Path) -> list[str]:
    res = subprocess.run([GNU_TAR, "-tzf", str(path)], capture_output=True, text=True)
    return res.stdout.splitlines()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(path: Path) -> str:
    with pytest.raises(NotVerifiedError) as exc:
        for m in iter_members(path):
            m.stream.read()
    return str(exc.value)


@needs_tar
def test_an_accepted_bundle_extracts_to_the_same_tree_with_gnu_tar(tmp_path):
    """The bundle writer's pax names (long, non-ASCII), a POSIX ustar prefix, pax size: both readers agree."""
    data = {"a/b.json": b"{}", LONG: b"long", "caf\u00e9/\u00fcber.txt": "non-ASCII".encode(),
            "m" * 120 + "/x": b"pax path"}
    out = tmp_path / "b.tar.gz"
    bundle.write_bundle(out, [bundle.Entry(n, hashlib.sha256(d).hexdigest(), data=d) for n, d in data.items()])
    pax_size = bytearray(_pax({"size": "4"}, "sized.bin", b"four"))  # with a pax size record
    ustar = archive((header(LONG, 4), b"ustr"), (header("plain.txt", 2), b"ok"), path=tmp_path / "u.tar.gz")
    (tmp_path / "p.tar.gz").write_bytes(gzip.compress(bytes(pax_size) + ZEROS, mtime=0))
    for path, want in ((out, data), (ustar, {LONG: b"ustr", "plain.txt": b"ok"}),
                       (tmp_path / "p.tar.gz", {"sized.bin": b"four"})):
        ours, gnu = tmp_path / f"ours-{path.name}", tmp_path / f"gnu-{path.name}"
        ours.mkdir()
        gnu.mkdir()
        extract_to(path, ours)
        subprocess.run([GNU_TAR, "-xzf", str(path), "-C", str(gnu)], check=True)
        assert tree(ours) == tree(gnu) == want


@needs_tar
@pytest.mark.parametrize("magic, named", [(b"ustar  \0", "old-GNU tar header"), (b"\0" * 8, "v7 (no magic)")])
def test_a_prefix_under_non_posix_magic_is_refused(tmp_path, magic, named):
    """The attack: GNU tar ignores the prefix, so this member lands on top of `f...json` at the top level."""
    hostile = with_magic(header(LONG, 6), magic)
    path = archive((header(LONG_FILE, 5), b"first"), (hostile, b"second"), path=tmp_path / "h.tar.gz")
    assert python_names(path) == [LONG_FILE, LONG]  # what the old verify saw: two distinct files
    assert gnu_names(path) == [LONG_FILE, LONG_FILE]  # what `tar -xzf` writes: the second overwrites the first
    assert named in refused(path) and "only POSIX ustar/pax headers are accepted" in refused(path)


def _gnu_longname() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("g" * 150)
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"g"))
    return buf.getvalue()


def _posix_magic_longname() -> bytes:
    return bytes(with_magic(bytearray(_gnu_longname()), tarfile.POSIX_MAGIC))


def _pax(headers: dict[str, str], name: str = "x.txt", data: bytes = b"x") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.pax_headers = len(data), headers
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + block(data)


def _global_pax() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "elsewhere"}) as tf:
        ti = tarfile.TarInfo("x.txt")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    return buf.getvalue()


def _two_pax_headers() -> bytes:
    first = tarfile.TarInfo._create_pax_generic_header({"path": "one.txt"}, tarfile.XHDTYPE, "utf-8")
    return first + _pax({"path": "two.txt"})


def _base256_size() -> bytes:
    buf = header("x.txt", 1)
    buf[124:136] = b"\x80" + (1).to_bytes(11, "big")
    return bytes(rechecksum(buf)) + block(b"x")


HEADER_CASES = {
    "GNU long name (old-GNU magic)": (_gnu_longname, "old-GNU tar header"),
    "GNU long name (POSIX magic)": (_posix_magic_longname, "GNU long name"),
    "pax global header": (lambda: _global_pax(), "pax global header"),
    "two pax headers for one member": (lambda: _two_pax_headers() + ZEROS, "at most one pax header"),
    "pax linkpath": (lambda: _pax({"linkpath": "/etc/passwd"}) + ZEROS, "pax keyword(s) 'linkpath'"),
    "pax comment": (lambda: _pax({"comment": "hi"}) + ZEROS, "pax keyword(s) 'comment'"),
    "pax hdrcharset": (lambda: _pax({"hdrcharset": "BINARY"}) + ZEROS, "pax keyword(s) 'hdrcharset'"),
    "pax GNU sparse map": (lambda: _pax({"GNU.sparse.name": "y.txt"}) + ZEROS, "GNU.sparse.name"),
    "base-256 size": (lambda: _base256_size() + ZEROS, "base-256 number in the size field"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_non_posix_headers_are_refused(tmp_path, case):
    make, named = HEADER_CASES[case]
    path = tmp_path / "h.tar.gz"
    path.write_bytes(gzip.compress(make(), mtime=0))
    assert python_names(path)  # plain tarfile reads every one of these without complaint
    assert named in refused(path)
