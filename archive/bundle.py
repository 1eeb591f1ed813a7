"""Deterministic tar.gz writing: the same files give the same bytes, on any day, as any user.

Entries are regular files only, sorted by path, with mtime 0, uid/gid 0, empty
owner names and mode 0644, in POSIX pax format. The gzip stream is a sequence of
gzip members (valid gzip: `gzip -d` and `tar xzf` read it as one stream), each with
mtime 0 and no file name: text and records are deflated, large binary artifacts
(weights, activations: they barely compress) are stored, so verifying a bundle
with --include-large runs at hashing speed instead of inflate speed. Each file's
sha256 is recomputed as it is copied into the tar and must equal the digest that
was signed, so a file that changes mid-export aborts the export instead of
producing a bundle that fails verification.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sasgate.errors import ArtifactError, SasgateError

FIXED_MTIME = 0
FILE_MODE = 0o644
COMPRESSLEVEL = 6
STORED = 0

# The bundle layout: project files at their project-relative paths, plus these.
CRATE = "ro-crate-metadata.json"
META_DIR = "_sasgate"
BUNDLE_INFO = f"{META_DIR}/bundle.json"
ENVIRONMENT = f"{META_DIR}/environment.json"
ENVELOPE = f"{META_DIR}/statement.dsse.json"  # the one file the statement does not list
BUNDLE_SCHEMA = "sasgate.bundle/1"
PREDICATE_SCHEMA = "sasgate.negative-result/1"


class _Info(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Tolerances(_Info):
    """How far a re-run's gate figures may move and still be decision-equivalent: |new - old| <= atol + rtol*|old|."""

    rtol: float = Field(ge=0)
    atol: float = Field(ge=0)
    rule: str


class GitInfo(_Info):
    commit: str | None
    commit_date: str | None
    dirty: bool
    dirty_paths: list[str]
    untracked_included: list[str]


class LargeArtifact(_Info):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    md5: str
    out: str
    out_md5: str | None
    stage: str
    included: bool


class Remote(_Info):
    name: str
    url: str


class Signer(_Info):
    keyid: str
    name: str | None


class BundleInfo(_Info):
    """`_sasgate/bundle.json`: what export knew that the project files do not say."""

    schema_: Literal["sasgate.bundle/1"] = Field(alias="schema")
    sasgate_version: str
    git: GitInfo
    stages: list[str]
    dvc_remote: Remote | None
    include_large: bool
    large_artifacts: list[LargeArtifact]
    tolerances: Tolerances
    signer: Signer

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, populate_by_name=True)


def validate_bundle_info(raw: Any, error: type[SasgateError]) -> BundleInfo:
    """bundle.json typed; a malformed one (negative tolerances included) is one `error` naming the field."""
    from sasgate.validation import describe_validation

    try:
        return BundleInfo.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{BUNDLE_INFO}: invalid: {describe_validation(exc)}") from None


def reserved(name: str) -> bool:
    """Names the bundle format owns; a project file with one of them cannot be bundled."""
    return name == CRATE or name == META_DIR or name.startswith(META_DIR + "/")


@dataclass(frozen=True)
class Entry:
    """One bundle member: its path inside the bundle, where its bytes come from, their sha256."""

    name: str
    sha256: str
    source: Path | None = None
    data: bytes | None = None
    compress: bool = True  # False: stored (large binary artifacts)

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data) if self.data is not None else open(self.source, "rb")  # type: ignore[arg-type]


class _Hashing(io.RawIOBase):
    """Passes reads through while hashing them (the TOCTOU check while copying into the tar)."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner, self.h = inner, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.h.update(data)
        return data


@contextlib.contextmanager
def atomic_stream(path: Path) -> Iterator[BinaryIO]:
    """A file handle whose contents appear at path only if the block completes (temp + fsync + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.type = size, FIXED_MTIME, FILE_MODE, tarfile.REGTYPE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


class _GzipMembers(io.RawIOBase):
    """A write-only stream that gzips what it is given, starting a new gzip member when the level changes."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.pos, self.level, self.z = out, 0, -1, None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def use_level(self, level: int) -> None:
        if level != self.level:
            self.end_member()
            self.level, self.z = level, zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip, mtime 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        assert self.z is not None
        self.out.write(self.z.compress(data))
        self.pos += len(data)
        return len(data)

    def end_member(self) -> None:
        if self.z is not None:
            self.out.write(self.z.flush())
            self.z, self.level = None, -1


def write_bundle(out: Path, entries: list[Entry]) -> None:
    """Write the entries as one deterministic tar.gz at out (atomically)."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("duplicate bundle entry names")
    with atomic_stream(out) as fh:
        gz = _GzipMembers(fh)
        gz.use_level(COMPRESSLEVEL)
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20) as tf:
            for e in sorted(entries, key=lambda e: e.name):
                gz.use_level(COMPRESSLEVEL if e.compress else STORED)
                with e.open() as src:
                    size = os.fstat(src.fileno()).st_size if e.data is None else len(e.data)
                    hashing = _Hashing(src)
                    tf.addfile(tarinfo(e.name, size), hashing)
                if hashing.h.hexdigest() != e.sha256:
                    raise ArtifactError(f"{e.name} changed while the bundle was being written; export again")
            gz.use_level(COMPRESSLEVEL)  # the end-of-archive blocks
        gz.end_member()
