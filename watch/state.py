"""The watcher's state file: what the last poll saw, typed, read and rewritten under one file lock.

A run holds `<state>.lock` (filelock) from reading the state until its report has reached the
caller, so overlapping cron runs poll one after the other and the file always holds complete
polls. It is written atomically (temp file, fsync, rename); a poll that fails writes nothing.
Reading is strict (pydantic, JSON types as written: `"met": "false"` is an error, not True): a
malformed file is a ParamsError (exit 2) naming the field, and the file is left as it is, since
it holds the lock-time baseline that no later poll can recreate. A `sasgate.watch_state/1` file
(before typed records) is read as version 2 with every repo due to be read again. The state is
not a DVC output: it may carry times.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sasgate.artifacts import atomic_write_json
from sasgate.errors import HubUnreachableError, ParamsError

from .descriptors import SaeDescriptor, Skipped, Source

STATE_SCHEMA = "sasgate.watch_state/2"
_V1 = "sasgate.watch_state/1"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RepoRecord(_Record):
    """One listed Hub repo as the last read left it."""

    sha: str = Field(min_length=1)
    parser: int  # hub.PARSER_VERSION of the read; another version is read again
    retry: str | None = None  # the Hub refused part of it (gated, disabled, private, gone): read again next poll
    descriptors: list[SaeDescriptor]
    skipped: list[Skipped]
    last_modified: str | None
    tags: list[str]
    library_name: str | None
    scopes: list[str]


class TupleRef(_Record):
    model: str = Field(min_length=1)
    layer: Annotated[int, Field(ge=0)]
    site: str = Field(min_length=1)


class Reopen(_Record):
    met: bool
    since: str | None  # the poll that first found it met (UTC, ISO 8601)
    reported: bool  # a report saying so reached its caller (and --evaluate finished) since then
    notified: bool  # --notify-url delivered since then


class LastPoll(_Record):
    at: str
    sources: list[Source]
    exit_code: int


class HubState(_Record):
    repos: dict[str, RepoRecord]


class WatchState(_Record):
    schema_: Literal["sasgate.watch_state/2"] = Field(alias="schema")
    required: list[TupleRef]
    baseline: dict[Source, list[str]]  # per source, the SAE ids of its first poll: "seen at lock time"
    seen: dict[Source, list[str]]  # per source, the SAE ids of its latest poll
    hub: HubState
    reopen: Reopen
    polls: Annotated[int, Field(ge=1)]
    last_poll: LastPoll

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _from_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 state as version 2: baseline, seen and reopen kept (a met reopen was reported by
    the poll that found it); every repo record emptied with parser 1, so the next poll reads it again."""
    out = {**raw, "schema": STATE_SCHEMA}
    hub = raw.get("hub")
    if isinstance(hub, dict) and isinstance(hub.get("repos"), dict):
        out["hub"] = {**hub, "repos": {r: {**rec, "parser": 1, "descriptors": [], "skipped": []}
                                       if isinstance(rec, dict) else rec for r, rec in hub["repos"].items()}}
    if isinstance(raw.get("reopen"), dict):
        out["reopen"] = {**raw["reopen"], "reported": raw["reopen"].get("met")}
    return out


def load(path: Path) -> WatchState | None:
    """The previous poll's state, or None before the first poll."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ParamsError(f"watch state {path} is unreadable ({exc}); it is left as it is: fix it, or move it away "
                          "to start a new baseline") from None
    if isinstance(raw, dict) and raw.get("schema") == _V1:
        text = json.dumps(_from_v1(raw))
    try:
        return WatchState.model_validate_json(text, strict=True)
    except ValidationError as exc:
        from sasgate.validation import describe_validation

        raise ParamsError(f"watch state {path}: {describe_validation(exc)}; it is left as it is: fix it, or move it "
                          "away to start a new baseline") from None


def save(path: Path, state: WatchState) -> None:
    atomic_write_json(path, state.to_json())


@contextlib.contextmanager
def locked(path: Path, timeout_s: float) -> Iterator[None]:
    """Hold the state's lock; an overlapping run waits up to `timeout_s`, then gives up (exit 75)."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise HubUnreachableError(f"another sasgate watch has held {path}.lock for {timeout_s:g} s; "
                                  "no poll this time") from None
    try:
        yield
    finally:
        lock.release()
