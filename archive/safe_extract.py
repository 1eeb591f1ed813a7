"""Reading a bundle that may be hostile: every member is checked before one byte of it is used.

A bundle is a gzip'd tar of regular files only. Rejected, with the member named:
absolute paths, `..`, `.` or empty components, backslashes and drive letters,
control, format (bidi) and other non-printable characters, symlinks, hard links,
device files, FIFOs, directories and other special members, duplicate names (also
after Unicode/case folding, and a file that is also a folder prefix of another),
members over the size cap, more members or more bytes in total than the caps, paths
deeper than the cap, oversized tar headers (a pax header that asks for gigabytes),
truncated or corrupt gzip/tar streams, and data after the end-of-archive marker.

Tar header rule (ARCHITECTURE.md, "The archive contract"): every header block must be
POSIX ustar (magic "ustar\\0", version "00") with octal numbers, and a member is one
ustar header optionally preceded by one pax extended header whose keywords are only
`path` and `size`. Old-GNU and v7 headers, GNU long-name/long-link, sparse and other
vendor types, global pax headers, base-256 numbers and any other pax keyword are
refused: Python's tarfile and GNU tar read those differently (tarfile joins the ustar
`prefix` under any magic, GNU tar only under POSIX magic), so the tree `verify` checks
would not be the tree `tar -xzf` writes.

Nothing is extracted by `iter_members`; `extract_to` writes only below a fresh, empty
folder, with O_EXCL | O_NOFOLLOW, after the same checks.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from sasgate.errors import NotVerifiedError

CHUNK = 1 << 20
_MAX_HEADER_READ = 1 << 20  # a single tar header/pax block larger than this is hostile


@dataclass(frozen=True)
class Limits:
    """Caps for untrusted bundles; the defaults leave room for --include-large bundles."""

    max_members: int = 20_000
    max_member_bytes: int = 64 << 30
    max_total_bytes: int = 256 << 30
    max_depth: int = 24
    max_name_bytes: int = 1024
    max_component_bytes: int = 255


class _Capped(io.RawIOBase):
    """The decompressed stream, counting bytes and refusing to read past the total cap."""

    def __init__(self, inner: BinaryIO, limits: Limits, origin: str) -> None:
        self.inner, self.limits, self.origin = inner, limits, origin
        self.reading_member = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.inner.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.inner.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or (size > _MAX_HEADER_READ and not self.reading_member):
            raise NotVerifiedError(f"{self.origin}: oversized tar header ({size} bytes requested)")
        if self.inner.tell() + size > self.limits.max_total_bytes + (1 << 20):
            raise NotVerifiedError(f"{self.origin}: more than {self.limits.max_total_bytes} bytes uncompressed")
        return self.inner.read(size)

    def readinto(self, b: bytearray) -> int:  # pragma: no cover - tarfile uses read()
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def check_name(name: str, limits: Limits) -> str | None:
    """Why a member name is unsafe, or None when it is a plain relative posix path."""
    if not name:
        return "empty name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "control character in name"
    if not name.isprintable():  # C1 controls, bidi and other format characters, separators, unassigned
        return "non-printable character in name (C1 control, bidi or other format character)"
    if "\\" in name:
        return "backslash in name"
    if name.startswith("/"):
        return "absolute path"
    if len(name) > 1 and name[1] == ":":
        return "drive-letter path"
    if len(name.encode()) > limits.max_name_bytes:
        return f"name longer than {limits.max_name_bytes} bytes"
    parts = name.split("/")
    if ".." in parts:
        return "path traversal ('..')"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' path component"
    if any(len(p.encode()) > limits.max_component_bytes for p in parts):
        return f"path component longer than {limits.max_component_bytes} bytes"
    if len(parts) > limits.max_depth:
        return f"nested deeper than {limits.max_depth} levels"
    return None


def _kind(m: tarfile.TarInfo) -> str | None:
    """Why a member's type is not allowed, or None for a plain regular file."""
    if m.issym():
        return f"symlink (to {m.linkname!r})"
    if m.islnk():
        return f"hard link (to {m.linkname!r})"
    if m.ischr() or m.isblk():
        return "device file"
    if m.isfifo():
        return "FIFO"
    if m.isdir():
        return "directory entry"
    if m.issparse():
        return "sparse file"
    if not m.isreg():
        return f"unsupported member type {m.type!r}"
    return None


_STREAM_ERRORS = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error)

POSIX_MAGIC = b"ustar\0" + b"00"  # magic + version of a POSIX ustar header (old GNU: b"ustar  \0")
PAX_KEYWORDS = frozenset({"path", "size"})  # the only ones the bundle writer needs (long or non-ASCII names, >8 GiB)
_POSIX_TYPES = frozenset(b"01234567x")  # plus NUL (old regular file); other types are vendor extensions
_NUMERIC_FIELDS = ((100, "mode"), (108, "uid"), (116, "gid"), (124, "size"), (136, "mtime"), (329, "devmajor"),
                   (337, "devminor"))


def _header_problem(buf: bytes) -> str | None:
    """Why one 512-byte header block is not plain POSIX ustar, or None."""
    if buf[257:265] != POSIX_MAGIC:
        kind = "old-GNU" if buf[257:265] == b"ustar  \0" else "v7 (no magic)" if not buf[257:265].strip(b"\0") \
            else f"unknown magic {buf[257:265]!r}"
        return f"{kind} tar header; only POSIX ustar/pax headers are accepted"
    if buf[156] != 0 and buf[156] not in _POSIX_TYPES:
        what = {ord("L"): "GNU long name", ord("K"): "GNU long link name", ord("g"): "pax global header",
                ord("S"): "GNU sparse file"}.get(buf[156], "vendor extension")
        return f"tar header type {chr(buf[156])!r} ({what}); only POSIX ustar/pax headers are accepted"
    for offset, field in _NUMERIC_FIELDS:
        if buf[offset] & 0x80:
            return f"base-256 number in the {field} field (a GNU extension); only octal is POSIX"
    return None


def _posix_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo class that checks every header block as tarfile parses it and logs the block types.

    One class per archive: `blocks` lists the types of the header blocks read since the last member.
    """

    class PosixTarInfo(tarfile.TarInfo):
        blocks: list[str] = []

        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            info = super().frombuf(buf, encoding, errors)  # zero, truncated or bad-checksum blocks raise here
            if problem := _header_problem(buf):
                name = tarfile.nts(buf[345:500], "utf-8", "backslashreplace")
                name = (name + "/" if name else "") + tarfile.nts(buf[0:100], "utf-8", "backslashreplace")
                raise NotVerifiedError(f"member {name!r}: {problem}")
            cls.blocks.append(info.type.decode("latin-1"))
            return info

    PosixTarInfo.blocks = []
    return PosixTarInfo


def _pax_problem(m: tarfile.TarInfo, blocks: list[str]) -> str | None:
    """Why a member's header blocks are not one ustar header after at most one pax header, or None."""
    if blocks[:-1] not in ([], ["x"]):
        return f"header blocks {''.join(blocks)!r}: a member is one ustar header after at most one pax header"
    if extra := sorted(set(m.pax_headers) - PAX_KEYWORDS):
        return f"pax keyword(s) {', '.join(map(repr, extra))}; only {', '.join(sorted(PAX_KEYWORDS))} are accepted"
    return None


class _Guarded(io.RawIOBase):
    """A member's data; a truncated or corrupt stream becomes NotVerifiedError naming the member."""

    def __init__(self, inner: BinaryIO, where: str) -> None:
        self.inner, self.where = inner, where

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self.inner.read(size)
        except _STREAM_ERRORS as exc:
            raise NotVerifiedError(f"{self.where}: truncated or corrupt data ({exc})") from None


@dataclass
class Member:
    name: str
    size: int
    stream: BinaryIO


class _Seen:
    """Duplicate and file/folder-conflict detection across the names read so far."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def add(self, name: str) -> str | None:
        key = _folded(name)
        if key in self.files:
            return "duplicate name"
        if key in self.dirs:
            return "name is also a folder of another member"
        parents = key.split("/")[:-1]
        prefixes = {"/".join(parents[: i + 1]) for i in range(len(parents))}
        if prefixes & self.files:
            return "a parent folder of this member is also a file"
        self.files.add(key)
        self.dirs |= prefixes
        return None


def iter_members(path: str | os.PathLike, limits: Limits = Limits(), origin: str | None = None) -> Iterator[Member]:
    """Yield each member of the bundle after its checks; the caller must read each stream in turn.

    Raises NotVerifiedError (naming the bundle and the member) on anything listed in
    the module docstring. Iterating to the end also checks the end-of-archive marker.
    """
    origin = origin or os.fspath(path)
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            capped = _Capped(gz, limits, origin)
            yield from _walk(capped, limits, origin)
    except NotVerifiedError:
        raise
    except _STREAM_ERRORS as exc:
        raise NotVerifiedError(f"{origin}: truncated or corrupt archive ({exc})") from None
    except OSError as exc:
        raise NotVerifiedError(f"{origin}: cannot read archive ({exc})") from None


def _walk(capped: _Capped, limits: Limits, origin: str) -> Iterator[Member]:
    info_class = _posix_tarinfo()
    try:
        tf = tarfile.open(fileobj=capped, mode="r:", tarinfo=info_class)  # noqa: SIM115 - closed below
    except NotVerifiedError as exc:
        raise NotVerifiedError(f"{origin}: {exc}") from None
    seen = _Seen()
    total = count = 0
    try:
        while (m := _next(tf, origin)) is not None:
            count += 1
            where = f"{origin}: member {m.name!r}"
            blocks, info_class.blocks = info_class.blocks, []
            if count > limits.max_members:
                raise NotVerifiedError(f"{origin}: more than {limits.max_members} members")
            for problem in (_pax_problem(m, blocks), check_name(m.name, limits), _kind(m)):
                if problem:
                    raise NotVerifiedError(f"{where}: {problem}")
            if m.size > limits.max_member_bytes:
                raise NotVerifiedError(f"{where}: {m.size} bytes, over the {limits.max_member_bytes}-byte cap")
            total += m.size
            if total > limits.max_total_bytes:
                raise NotVerifiedError(f"{where}: archive over {limits.max_total_bytes} bytes in total")
            if problem := seen.add(m.name):
                raise NotVerifiedError(f"{where}: {problem}")
            inner = tf.extractfile(m)
            assert inner is not None  # regular file
            stream = _Guarded(inner, where)
            capped.reading_member = True
            try:
                yield Member(m.name, m.size, stream)
                while stream.read(CHUNK):  # whatever the caller left unread, so truncation is seen
                    pass
            finally:
                capped.reading_member = False
        _check_end(capped, tf.offset, origin)
    finally:
        tf.close()


def _next(tf: tarfile.TarFile, origin: str) -> tarfile.TarInfo | None:
    """The next member; a header refused by PosixTarInfo is named with the archive."""
    try:
        return tf.next()
    except NotVerifiedError as exc:
        raise NotVerifiedError(f"{origin}: {exc}") from None


def _check_end(capped: _Capped, offset: int, origin: str) -> None:
    """After the last member: at least two zero blocks and nothing but zeros to the end."""
    capped.seek(offset)
    zeros = 0
    while chunk := capped.read(64 * 1024):
        if chunk.strip(b"\0"):
            raise NotVerifiedError(f"{origin}: data after the last member (a corrupt tar header or appended data)")
        zeros += len(chunk)
        if zeros > 1 << 20:
            raise NotVerifiedError(f"{origin}: over 1 MiB of padding after the end-of-archive marker")
    if zeros < 2 * tarfile.BLOCKSIZE:
        raise NotVerifiedError(f"{origin}: truncated archive (no end-of-archive marker)")


def read_all(path: str | os.PathLike, on_member: Callable[[Member], None], limits: Limits = Limits()) -> int:
    """Run on_member for every member (checked, in archive order); returns the member count."""
    n = 0
    for member in iter_members(path, limits):
        on_member(member)
        n += 1
    return n


def open_target(root: Path, name: str) -> BinaryIO:
    """A new file for a checked member name strictly below root (O_EXCL | O_NOFOLLOW: never overwrite or follow)."""
    root = root.resolve()
    target = root.joinpath(*name.split("/"))
    if os.path.commonpath([root, os.path.normpath(target)]) != str(root) or target == root:
        raise NotVerifiedError(f"member {name!r} would be written outside {root}")
    target.parent.mkdir(parents=True, exist_ok=True)
    return os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb")


def extract_to(path: str | os.PathLike, dest: str | os.PathLike, limits: Limits = Limits()) -> list[str]:
    """Extract into dest, which must be an empty folder; returns the member names in archive order."""
    dest = Path(dest)
    if not dest.is_dir() or any(dest.iterdir()):
        raise ValueError(f"{dest} must be an existing empty folder")
    names: list[str] = []

    def write(member: Member) -> None:
        with open_target(dest, member.name) as out:
            while chunk := member.stream.read(CHUNK):
                out.write(chunk)
        names.append(member.name)

    read_all(path, write, limits)
    return names
