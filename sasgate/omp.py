"""OpenMP's wait policy (`runtime.omp_wait_policy`), which must be in the environment before torch loads.

GNU OpenMP (libgomp, which torch's CPU build uses) reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once,
when it loads. Its default makes a thread that reaches a barrier spin for a while before sleeping;
on a machine whose cores are held by other processes, the spinning thread burns the time slice its
partner needs, and every parallel op waits for a descheduled thread. `passive` makes waiting threads
sleep at once. The policy changes no number (only how idle threads wait), so it is recorded in the
run log; the thread count, which can change the last bits of a reduction, is a DVC param.

`preset()` runs in `sasgate/stages/__init__.py`, before any stage module imports torch, and applies
the default; `ensure(policy)` runs once params are read and re-executes the stage in a fresh process
when params ask for another policy than the one this process started with.
"""

from __future__ import annotations

import os
import sys
from typing import Literal

WaitPolicy = Literal["passive", "unset"]
DEFAULT: WaitPolicy = "passive"
# What each policy puts in the environment; "unset" leaves OpenMP's own default (spin, then sleep).
ENV: dict[str, dict[str, str]] = {"passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}, "unset": {}}
VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
MARKER = "SASGATE_OMP_WAIT_POLICY"  # the policy this process (and its children) was started with


def apply(policy: WaitPolicy, env: dict[str, str] | None = None) -> dict[str, str]:
    """Set `policy` in `env` (default: this process's environment, for a torch not loaded yet)."""
    env = os.environ if env is None else env
    for var in VARS:
        env.pop(var, None)
    env.update(ENV[policy])
    env[MARKER] = policy
    return env


def preset() -> None:
    """Apply the default policy unless one was chosen already (by a parent process or `apply`)."""
    if MARKER not in os.environ and "torch" not in sys.modules:
        apply(DEFAULT)


def started_with() -> str | None:
    """The policy this process started torch with; None when torch loaded before sasgate chose one."""
    return os.environ.get(MARKER)


def ensure(policy: WaitPolicy, module: str) -> None:
    """Re-run `python -m module` with the same arguments under `policy` when this process started
    with another one (too late to change: libgomp has read its environment)."""
    if started_with() == policy:
        return
    if os.environ.get(MARKER + "_REEXEC") == policy:  # the re-run did not take: never loop
        raise RuntimeError(f"OpenMP wait policy {policy!r} could not be applied (torch loaded before sasgate)")
    env = apply(policy, dict(os.environ))
    env[MARKER + "_REEXEC"] = policy
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def record() -> dict[str, str | None]:
    """What the run log keeps: the policy and the variables libgomp read."""
    return {"omp_wait_policy": started_with(), **{v.lower(): os.environ.get(v) for v in VARS}}
