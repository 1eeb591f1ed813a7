"""The locked, versioned refusal scorer and its labelled check set.

A scorer version is one stdlib-only module in `sasgate/scorer_versions/` (v1.py, v2.py, ...).
`load_scorer` hashes the file and executes exactly the hashed bytes, so the sha256 stored
next to every score names the code that produced it. A released version (in RELEASED) whose
bytes changed is refused (ScorerTamperedError): results scored with it could no longer be
audited. To change the scorer, add v3.py; it loads unreleased (its computed hash is recorded)
until its hash is added to RELEASED.

The check set (data/scorer_check.jsonl, hand-written, labelled refusal/compliance) is locked
like the eval set (data/scorer_check.lock, `sasgate scorer lock --reason TEXT`), so a scorer's
agreement is always measured against the same labels.
"""

from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .artifacts import read_text, sha256_bytes
from .errors import ArtifactError, DataError, LockedSetError, ParamsError, ScorerTamperedError
from .evalset import RELOCK_HINT, verify_lock, write_lock
from .paths import Paths

VERSIONS_DIR = Path(__file__).with_name("scorer_versions")
RELEASED: dict[str, str] = {
    "v1": "fbd61034256fb3f76effa17969b83daa6789abcaa58b14ae6dec760a68a984cc",
    "v2": "ab91123cb47cfc5ee7dea154b614916aea35219e0d85e6a8ff684f5792c35046",
}
DEFAULT_VERSION = "v2"

CHECK_FILE = "scorer_check.jsonl"
CHECK_LOCK = "scorer_check.lock"
CHECK_SCHEMA = "sasgate.scorercheck/1"
CHECK_RELOCK_HINT = "sasgate scorer lock --reason TEXT"
LABELS = ("refusal", "compliance")
# Kinds whose label a reader could dispute: each item of these needs a note saying why.
PLAIN_KINDS = {"plain_refusal", "plain_compliance"}
_VERSION_NAME = re.compile(r"v[0-9]+")

State = Literal["ok", "tampered", "unreleased", "missing"]


@dataclass(frozen=True)
class Scorer:
    """One loaded scorer version: `score(completion)` is True for a refusal."""

    version: str
    sha256: str
    released: bool
    path: Path
    _fn: Callable[[str], Any] = field(repr=False)

    def score(self, completion: str) -> bool:
        return bool(self._fn(completion))


@dataclass(frozen=True)
class VersionStatus:
    version: str
    sha256: str | None  # of the file as it is now (None: missing)
    released_sha256: str | None
    state: State


def _version_file(version: str, versions_dir: Path) -> Path:
    if not isinstance(version, str) or not _VERSION_NAME.fullmatch(version):
        raise ParamsError(f"scorer version {version!r} is not a version name like 'v2' (known: {_known(versions_dir)})")
    return versions_dir / f"{version}.py"


def _version_names(versions_dir: Path) -> list[str]:
    """Released versions and version files, in version order (v2 before v10)."""
    names = set(RELEASED) | {p.stem for p in versions_dir.glob("v*.py") if _VERSION_NAME.fullmatch(p.stem)}
    return sorted(names, key=lambda v: int(v[1:]))


def _known(versions_dir: Path) -> str:
    return ", ".join(_version_names(versions_dir))


def _tampered(version: str, path: Path, actual: str) -> ScorerTamperedError:
    new = f"v{int(_version_names(path.parent)[-1][1:]) + 1}.py"
    return ScorerTamperedError(
        f"scorer {version}: {path} was released with sha256 {RELEASED[version]} but now has sha256 {actual}; "
        f"released scorer versions are immutable: restore the file and add a new version ({new}) instead of "
        f"editing a released one")


def load_scorer(version: str, versions_dir: str | Path | None = None) -> Scorer:
    """Load `version` from `versions_dir` (default VERSIONS_DIR), refusing a released version whose
    bytes changed; runs exactly the hashed bytes, never a separately imported module."""
    versions_dir = Path(versions_dir or VERSIONS_DIR)
    path = _version_file(version, versions_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if version in RELEASED:
            raise ScorerTamperedError(f"scorer {version}: released file {path} is missing; restore it") from None
        raise ParamsError(f"unknown scorer version {version!r} (known: {_known(versions_dir)})") from None
    digest = sha256_bytes(data)
    released = version in RELEASED
    if released and digest != RELEASED[version]:
        raise _tampered(version, path, digest)
    module = types.ModuleType(f"sasgate.scorer_versions.{version}")
    module.__file__ = str(path)
    exec(compile(data, str(path), "exec"), module.__dict__)
    fn = getattr(module, "score", None)
    if getattr(module, "VERSION", None) != version or not callable(fn):
        raise ArtifactError(f"scorer file {path} must define VERSION = {version!r} and a function score(completion)")
    return Scorer(version=version, sha256=digest, released=released, path=path, _fn=fn)


def checked_scorer(version: str, versions_dir: str | Path | None = None) -> Scorer:
    """The scorer `version`, after checking that no released version's code changed (an edit to v1 is caught
    even while v2 scores): ScorerTamperedError, exit 7."""
    for v in sorted(RELEASED):
        load_scorer(v, versions_dir)
    return load_scorer(version, versions_dir)


def list_versions(versions_dir: str | Path | None = None) -> list[VersionStatus]:
    """Every released version and every version file (default VERSIONS_DIR), with its hash and state."""
    versions_dir = Path(versions_dir or VERSIONS_DIR)
    out = []
    for v in _version_names(versions_dir):
        path = versions_dir / f"{v}.py"
        actual = sha256_bytes(path.read_bytes()) if path.is_file() else None
        expected = RELEASED.get(v)
        if actual is None:
            state: State = "missing"
        elif expected is None:
            state = "unreleased"
        else:
            state = "ok" if actual == expected else "tampered"
        out.append(VersionStatus(v, actual, expected, state))
    return out


# ---------------------------------------------------------------------------
# the labelled check set


class CheckItem(BaseModel):
    """One hand-labelled completion of the scorer check set."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str = Field(min_length=1)
    completion: str
    label: Literal["refusal", "compliance"]
    kind: str = Field(min_length=1)
    note: str | None = None

    @model_validator(mode="after")
    def _tricky_needs_note(self) -> "CheckItem":
        if self.kind not in PLAIN_KINDS and not (self.note or "").strip():
            raise ValueError(f"items of kind {self.kind!r} need a note saying why the label is what it is")
        return self


def check_paths(paths: Paths) -> tuple[Path, Path]:
    """(data/scorer_check.jsonl, data/scorer_check.lock)."""
    return paths.data / CHECK_FILE, paths.data / CHECK_LOCK


def read_check_records(path: Path) -> list[dict[str, Any]]:
    """The check set's records as written, each validated as a CheckItem (DataError naming the line)."""
    lines = read_text(path, DataError, f"scorer check set {path} is missing").splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            CheckItem.model_validate(record)
        except json.JSONDecodeError as exc:
            raise DataError(f"scorer check set {path} line {n}: not JSON ({exc})") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'item'}: {e['msg']}" for e in exc.errors())
            raise DataError(f"scorer check set {path} line {n}: {problems}") from None
        records.append(record)
    if not records:
        raise DataError(f"scorer check set {path} has no items")
    return records


def load_check_set(paths: Paths) -> list[CheckItem]:
    """The check set, refused (LockedSetError) unless it matches data/scorer_check.lock."""
    data, lock = check_paths(paths)
    records = read_check_records(data)
    try:
        verify_lock(lock, records, schema=CHECK_SCHEMA, what="scorer check set", lock_name=_rel(paths, lock),
                    show="completion")
    except LockedSetError as exc:
        raise LockedSetError(_own_hint(exc, "the resolved set", f"{_rel(paths, data)}")) from None
    return [CheckItem.model_validate(r) for r in records]


def lock_check_set(paths: Paths, reason: str) -> dict[str, Any]:
    """Write data/scorer_check.lock for the check set as it is now, appending `reason` to the history."""
    data, lock = check_paths(paths)
    records = read_check_records(data)
    counts = {"label": _count(r["label"] for r in records), "kind": _count(r["kind"] for r in records)}
    try:
        return write_lock(lock, records, schema=CHECK_SCHEMA, reason=reason, source={"file": _rel(paths, data)},
                          counts=counts, what="scorer check set")
    except ParamsError as exc:
        raise ParamsError(_own_hint(exc)) from None


def _own_hint(exc: Exception, *replace: str) -> str:
    """The generic lock's message with this set's re-lock command (and wording) in it."""
    msg = str(exc).replace(RELOCK_HINT, CHECK_RELOCK_HINT)
    return msg.replace(*replace, 1) if replace else msg


def _rel(paths: Paths, p: Path) -> str:
    return paths.rel(p) if p.is_relative_to(paths.root) else str(p)


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------
# agreement


@dataclass(frozen=True)
class AgreementReport:
    version: str
    sha256: str
    n: int
    agreement: float
    per_kind: dict[str, float]
    confusion: dict[str, dict[str, int]]  # label -> predicted -> count
    disagreements: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "n": self.n, "agreement": self.agreement,
                "per_kind": self.per_kind, "confusion": self.confusion, "disagreements": self.disagreements}


def agreement(scorer: Scorer, items: list[CheckItem]) -> AgreementReport:
    """Share of check items the scorer labels as the humans did, overall and per kind."""
    if not items:
        raise DataError("scorer agreement needs at least one check item")
    confusion = {label: {pred: 0 for pred in LABELS} for label in LABELS}
    hits: dict[str, list[bool]] = {}
    disagreements = []
    for item in items:
        predicted = "refusal" if scorer.score(item.completion) else "compliance"
        confusion[item.label][predicted] += 1
        hits.setdefault(item.kind, []).append(predicted == item.label)
        if predicted != item.label:
            disagreements.append({"id": item.id, "kind": item.kind, "label": item.label, "predicted": predicted,
                                  "completion": item.completion})
    n_agree = sum(sum(h) for h in hits.values())
    return AgreementReport(
        version=scorer.version, sha256=scorer.sha256, n=len(items), agreement=n_agree / len(items),
        per_kind={k: sum(h) / len(h) for k, h in sorted(hits.items())}, confusion=confusion,
        disagreements=disagreements)
