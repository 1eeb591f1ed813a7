"""Hostile bundles: every case is rejected, named, and nothing is written outside the temp folder."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sasgate.archive import bundle, keys
from sasgate.archive.safe_extract import Limits, check_name, extract_to, iter_members
from sasgate.cli import main
from sasgate.errors import NotVerifiedError


def member(name: str, data: bytes = b"x", **attrs) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti, data


def tar_bytes(members, tail: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue() + tail


def write(path: Path, raw_tar: bytes) -> Path:
    path.write_bytes(gzip.compress(raw_tar, mtime=0))
    return path


def snapshot(root: Path, skip: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if skip not in (p, *p.parents)}


OK = member("ok.txt", b"fine")
HUGE_HEADER = tarfile.TarInfo("huge.bin")
HUGE_HEADER.size = 100 << 30  # declares 100 GiB, carries 512 bytes

CASES = {
    "parent traversal": ([OK, member("../../escaped.txt")], "path traversal"),
    "nested traversal": ([member("a/../../../escaped.txt")], "path traversal"),
    "absolute path": ([member("/tmp/sasgate-abs-escape.txt")], "absolute path"),
    "symlink": ([member("link", type=tarfile.SYMTYPE, linkname="/"), member("link/escaped.txt")], "symlink"),
    "hard link": ([OK, member("hard", type=tarfile.LNKTYPE, linkname="ok.txt")], "hard link"),
    "char device": ([member("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)], "device file"),
    "block device": ([member("sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0)], "device file"),
    "fifo": ([member("pipe", type=tarfile.FIFOTYPE)], "FIFO"),
    "directory entry": ([member("dir", type=tarfile.DIRTYPE)], "directory entry"),
    "duplicate name": ([OK, member("ok.txt", b"second")], "duplicate name"),
    "case-folded duplicate": ([OK, member("OK.TXT")], "duplicate name"),
    "file then folder": ([member("a"), member("a/b")], "parent folder of this member is also a file"),
    "folder then file": ([member("a/b"), member("a")], "also a folder of another member"),
    "deep nesting": ([member("/".join(["d"] * 40) + "/f")], "nested deeper than"),
    "backslash": ([member("a\\..\\..\\x")], "backslash"),
    "drive letter": ([member("C:/windows/x")], "drive-letter"),
    "control character": ([member("a\nb")], "control character"),
    "dot component": ([member("./a/./b")], "'.' path component"),
}


def _raw(case: str) -> bytes:
    return tar_bytes(CASES[case][0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_member_rejected_and_nothing_written_outside(tmp_path, case):
    members, reason = CASES[case]
    src = write(tmp_path / "in.tar.gz", tar_bytes(members))
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path, work)
    with pytest.raises(NotVerifiedError, match=reason):
        extract_to(src, work)
    assert snapshot(tmp_path, work) == before
    assert not Path("/tmp/sasgate-abs-escape.txt").exists()
    for p in work.rglob("*"):
        assert not p.is_symlink() and (p.is_dir() or p.is_file())


def _huge_declared() -> bytes:
    return HUGE_HEADER.tobuf(tarfile.PAX_FORMAT) + b"\0" * 512


def _pax_bomb() -> bytes:
    ti, data = member("x.txt")
    ti.pax_headers = {"comment": "y" * (2 << 20)}
    return tar_bytes([(ti, data)])


STREAM_CASES = {
    "huge member (declared 100 GiB)": (lambda: _huge_declared(), Limits(), "over the .*-byte cap"),
    "member over a small cap": (lambda: tar_bytes([member("big", b"z" * 5000)]), Limits(max_member_bytes=4096),
                                "over the 4096-byte cap"),
    "too many members": (lambda: tar_bytes([member(f"f{i}") for i in range(6)]), Limits(max_members=5),
                         "more than 5 members"),
    "total over cap": (lambda: tar_bytes([member(f"f{i}", b"q" * 3000) for i in range(4)]),
                       Limits(max_total_bytes=10_000), "over 10000 bytes in total"),
    "oversized pax header": (_pax_bomb, Limits(), "oversized tar header"),
    "truncated tar (no end marker)": (lambda: tar_bytes([OK])[:1024], Limits(), "no end-of-archive marker"),
    "truncated inside a member": (lambda: tar_bytes([member("b.txt", b"b" * 5000)])[:2048], Limits(), "truncated"),
    "data after the end marker": (lambda: tar_bytes([OK], tail=b"appended junk"), Limits(), "data after the last"),
    "corrupt header mid-archive": (lambda: tar_bytes([OK])[:1024] + b"\x01" * 512 + b"\0" * 1024, Limits(),
                                   "data after the last member"),
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_hostile_stream_rejected(tmp_path, case):
    make, limits, reason = STREAM_CASES[case]
    src = write(tmp_path / "in.tar.gz", make())
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path, work)
    with pytest.raises(NotVerifiedError, match=reason):
        extract_to(src, work, limits)
    assert snapshot(tmp_path, work) == before


def test_truncated_gzip_and_non_gzip_rejected(tmp_path):
    full = gzip.compress(tar_bytes([member("a.bin", bytes(range(256)) * 64)]), mtime=0)
    (tmp_path / "cut.tar.gz").write_bytes(full[: len(full) // 2])
    (tmp_path / "plain.tar").write_bytes(tar_bytes([OK]))
    for name in ("cut.tar.gz", "plain.tar"):
        with pytest.raises(NotVerifiedError, match="truncated or corrupt"):
            for m in iter_members(tmp_path / name):
                m.stream.read()


def test_clean_archive_extracts_exactly(tmp_path):
    src = write(tmp_path / "in.tar.gz", tar_bytes([OK, member("sub/dir/b.txt", b"bee")]))
    (tmp_path / "work").mkdir()
    assert extract_to(src, tmp_path / "work") == ["ok.txt", "sub/dir/b.txt"]
    assert (tmp_path / "work" / "sub" / "dir" / "b.txt").read_bytes() == b"bee"
    with pytest.raises(ValueError, match="empty folder"):
        extract_to(src, tmp_path / "work")


@pytest.mark.parametrize("name, ok", [("a/b.json", True), ("_sasgate/x", True), ("a//b", False), ("", False),
                                      ("x" * 300, False), ("a/" + "é" * 200, False)])
def test_check_name(name, ok):
    assert (check_name(name, Limits()) is None) == ok


@pytest.fixture
def pub(tmp_path):
    key = Ed25519PrivateKey.generate()
    p = tmp_path / "signer.pub"
    p.write_text(keys.openssh_public(key.public_key()) + "\n")
    return p


@pytest.mark.parametrize("case", ["parent traversal", "absolute path", "symlink", "hard link", "char device",
                                  "fifo", "duplicate name", "deep nesting"])
def test_cli_verify_rejects_hostile_bundle_with_exit_1(tmp_path, pub, case):
    """Through `sasgate archive verify --reproduce --workdir`: rejected before anything is re-run."""
    src = write(tmp_path / "hostile.tar.gz", _raw(case))
    work = tmp_path / "work"
    before = snapshot(tmp_path, work)
    res = CliRunner().invoke(main, ["archive", "verify", str(src), "--key", str(pub), "--reproduce",
                                    "--workdir", str(work)])
    assert res.exit_code == 1, res.output
    assert "NOT VERIFIED" in res.output and CASES[case][1] in res.output
    assert snapshot(tmp_path, work) == before
    assert not (work / "project").exists()


def test_cli_verify_without_reproduce_writes_nothing(tmp_path, pub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write(tmp_path / "hostile.tar.gz", _raw("parent traversal"))
    before = snapshot(tmp_path, tmp_path / "nonexistent")
    res = CliRunner().invoke(main, ["archive", "verify", str(src), "--key", str(pub)])
    assert res.exit_code == 1 and "path traversal" in res.output
    assert snapshot(tmp_path, tmp_path / "nonexistent") == before


def test_cli_show_on_hostile_bundle_fails_cleanly(tmp_path):
    src = write(tmp_path / "hostile.tar.gz", _raw("symlink"))
    res = CliRunner().invoke(main, ["archive", "show", str(src)])
    assert res.exit_code == 1 and "symlink" in res.output


def test_bundle_writer_is_deterministic_and_sorted(tmp_path):
    entries = [bundle.Entry(n, hashlib.sha256(d).hexdigest(), data=d) for n, d in
               [("z.txt", b"zed"), ("a/b.json", b"{}"), ("m" * 120 + "/long", b"pax name")]]
    bundle.write_bundle(tmp_path / "one.tar.gz", entries)
    bundle.write_bundle(tmp_path / "two.tar.gz", list(reversed(entries)))
    one = (tmp_path / "one.tar.gz").read_bytes()
    assert one == (tmp_path / "two.tar.gz").read_bytes()
    assert one[4:8] == b"\0\0\0\0" and not one[3] & 0x08  # gzip: mtime 0, no FNAME
    with tarfile.open(tmp_path / "one.tar.gz") as tf:
        infos = tf.getmembers()
    assert [i.name for i in infos] == sorted(e.name for e in entries)
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) for i in infos} == \
        {(0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}


def test_bundle_writer_aborts_when_a_file_changed_since_hashing(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("original")
    stale = bundle.Entry("f.txt", hashlib.sha256(b"before").hexdigest(), source=f)
    with pytest.raises(Exception, match="changed while the bundle was being written"):
        bundle.write_bundle(tmp_path / "out.tar.gz", [stale])
    assert not (tmp_path / "out.tar.gz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
