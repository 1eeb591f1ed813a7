"""The watcher's state file: what the last poll saw, read and rewritten under one file lock.

A poll holds `<state>.lock` (filelock) from reading the state to writing the new one, so two
overlapping cron runs poll one after the other and the file always holds one complete poll.
It is written atomically (temp file, fsync, rename); a poll that fails writes nothing.
The state is not a DVC output: it may carry times.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from sasgate.artifacts import atomic_write_json
from sasgate.errors import HubUnreachableError, ParamsError

STATE_SCHEMA = "sasgate.watch_state/1"


def load(path: Path) -> dict[str, Any] | None:
    """The previous poll's state, or None before the first poll."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ParamsError(f"watch state {path} is unreadable ({exc}); move it away to start a new baseline") from None
    if not isinstance(raw, dict) or raw.get("schema") != STATE_SCHEMA:
        raise ParamsError(f"watch state {path} is not a {STATE_SCHEMA} file; move it away to start a new baseline")
    return raw


def save(path: Path, state: dict[str, Any]) -> None:
    atomic_write_json(path, {**state, "schema": STATE_SCHEMA})


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
