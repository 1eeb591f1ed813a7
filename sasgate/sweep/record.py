"""The sweep record `<sweep.folder>/<id>/sweep.json`: what was submitted, from which commit, through
which remotes, and every attempt of every point. Written atomically by `submit` and `resubmit`;
never a DVC output (it holds job ids and times)."""

from __future__ import annotations

import json
from pathlib import Path
from pydantic import BaseModel, ConfigDict, ValidationError

from ..artifacts import atomic_write_json
from ..errors import SweepError
from .settings import SweepParams

SCHEMA = "sasgate.sweep/1"
RECORD_FILE = "sweep.json"
JOBS_DIR = "jobs"  # submitit's folder: pickled calls, results and each job's log


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Remote(_Strict):
    name: str
    url: str


class Attempt(_Strict):
    job_id: str
    submitted: str  # UTC, ISO 8601


class Point(_Strict):
    index: int
    name: str  # the DVC experiment's name: <sweep id>-p<index>
    overrides: list[str]  # the `dvc exp run -S` list of this point
    attempts: list[Attempt]


class SweepRecord(_Strict):
    """`schema` is added on write and checked on read."""

    id: str
    commit: str
    git_remote: Remote
    dvc_remote: Remote
    settings: SweepParams
    points: list[Point]

    def dump(self) -> dict:
        return {"schema": SCHEMA, **self.model_dump(mode="json")}


def sweep_dir(folder: Path, sweep_id: str) -> Path:
    return folder / sweep_id


def write(folder: Path, record: SweepRecord) -> Path:
    path = sweep_dir(folder, record.id) / RECORD_FILE
    atomic_write_json(path, record.dump())
    return path


def read(folder: Path, sweep_id: str | None) -> SweepRecord:
    """The named sweep, or the latest one in `folder` when no id is given."""
    if sweep_id is None:
        found = sorted(p.parent.name for p in folder.glob(f"*/{RECORD_FILE}"))
        if not found:
            raise SweepError(f"no sweep in {folder}/ (submit one with `sasgate sweep submit`)")
        sweep_id = found[-1]
    path = sweep_dir(folder, sweep_id) / RECORD_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"no sweep {sweep_id!r}: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise SweepError(f"{path}: unreadable sweep record: {exc}") from None
    if not isinstance(raw, dict) or raw.pop("schema", None) != SCHEMA:
        raise SweepError(f"{path}: not a {SCHEMA} record")
    try:
        record = SweepRecord.model_validate(raw)
    except ValidationError as exc:
        raise SweepError(f"{path}: invalid sweep record: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
    if record.id != sweep_id or not record.points or any(not p.attempts for p in record.points):
        raise SweepError(f"{path}: inconsistent sweep record (id, or a point without an attempt)")
    return record
