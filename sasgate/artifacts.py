"""Artifact I/O that obeys ARCHITECTURE.md §4's rules: atomic writes, canonical JSON, sha256 manifests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ArtifactError, SasgateError

MANIFEST_SCHEMA = "sasgate.manifest/1"
_CHUNK = 1 << 20


# File types that are (or may be) Python pickles: never downloaded, never loaded (DESIGN rule 5).
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib", ".dill")


def is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def canonical_json(obj: Any) -> str:
    """Sorted keys, fixed separators, trailing newline: the same object gives the same bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file beside the target, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, canonical_json(obj))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename.

    A stage killed midway leaves only a hidden `.name.tmp-*` folder, never a `path`
    that DVC or a rerun could take for a complete output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_files(path: Path) -> Iterator[Path]:
    """Every regular file under path (or path itself), in sorted order, hidden temp files skipped."""
    if path.is_file():
        yield path
        return
    for p in sorted(path.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
            yield p


def manifest_entries(paths: list[Path], root: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {sha256, size}} for every file under the given outputs."""
    entries: dict[str, dict[str, Any]] = {}
    for out in paths:
        if not out.exists():
            raise ArtifactError(f"cannot hash missing output {out.relative_to(root).as_posix()}")
        for f in iter_files(out):
            rel = f.relative_to(root).as_posix()
            entries[rel] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    return entries


def write_manifest(manifest_path: Path, stage: str, outputs: list[Path], root: Path) -> dict:
    """Write the stage's manifest: sha256 and size of every file it produced."""
    record = {"schema": MANIFEST_SCHEMA, "stage": stage, "files": manifest_entries(outputs, root)}
    atomic_write_json(manifest_path, record)
    return record


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, turning a missing or corrupt file into one clear ArtifactError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"missing artifact {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"corrupt artifact {path}: {exc}") from None


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """`manifests/<stage>.json`: the sha256 and size of every file one stage produced."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    schema_: Literal["sasgate.manifest/1"] = Field(alias="schema")
    stage: str = Field(min_length=1)
    files: dict[str, ManifestFile]

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, v: dict[str, ManifestFile]) -> dict[str, ManifestFile]:
        for rel in v:
            parts = rel.split("/")
            if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"{rel!r} is not a project-relative posix path")
        return v


def validate_manifest(raw: Any, origin: str, error: type[SasgateError] = ArtifactError) -> Manifest:
    """A Manifest from parsed JSON; a malformed one is one `error` naming the file and the field."""
    from .validation import describe_validation

    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{origin}: invalid manifest: {describe_validation(exc)}") from None
    stem = PurePosixPath(origin).stem
    if manifest.stage != stem:
        raise error(f"{origin}: invalid manifest: stage: is {manifest.stage!r}, the file is named for {stem!r}")
    return manifest


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate `manifests/<stage>.json` (missing, corrupt or malformed: ArtifactError, exit 5)."""
    return validate_manifest(read_json(path), origin=Path(path).as_posix())


def verify_manifest(manifest_path: Path, root: Path) -> list[str]:
    """Return the files whose sha256 or size no longer match the manifest (empty: intact)."""
    bad = []
    for rel, entry in sorted(read_manifest(manifest_path).files.items()):
        f = root / rel
        if not f.is_file() or f.stat().st_size != entry.size or sha256_file(f) != entry.sha256:
            bad.append(rel)
    return bad


def read_text(path: str | os.PathLike, error: type[SasgateError], missing: str) -> str:
    """A UTF-8 file's text; a missing file is one `error` whose message is `missing`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(missing) from None


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice (PyYAML would silently keep the last value; DVC refuses the file)."""


def _check_unique_keys(node: yaml.Node, where: str, seen_nodes: set[int]) -> None:
    if id(node) in seen_nodes:  # an alias of a node already checked (or a recursive one)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{where}[{i}]", seen_nodes)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            scalar = isinstance(key_node, yaml.ScalarNode)
            name = f"{where}.{key_node.value}" if where and scalar else (key_node.value if scalar else where)
            if scalar and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                if key in lines:
                    raise DuplicateKeyError(f"duplicate key {name!r} on lines {lines[key]} and {line} "
                                            f"(YAML would silently keep the second)")
                lines[key] = line
            _check_unique_keys(value_node, name, seen_nodes)


def parse_yaml(text: str) -> Any:
    """safe_load, refusing a mapping that names a key twice (DuplicateKeyError names it and both lines)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, "", set())
        return loader.construct_document(node)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike, error: type[SasgateError], missing: str) -> Any:
    """A YAML file's content; a missing file (`missing` is the message), invalid YAML or a duplicate key is one `error`."""
    text = read_text(path, error, missing)
    try:
        return parse_yaml(text)
    except DuplicateKeyError as exc:
        raise error(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
