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

from .errors import ParamsError

WaitPolicy = Literal["passive", "unset"]
DEFAULT: WaitPolicy = "passive"
# What each policy puts in the environment; "unset" leaves OpenMP's own default (spin, then sleep).
ENV: dict[str, dict[str, str]] = {"passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}, "unset": {}}
VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
MARKER = "SASGATE_OMP_WAIT_POLICY"  # the policy this process (and its children) was started with
REEXEC = "SASGATE_OMP_REEXEC"  # set across ensure()'s re-execution, so it can never loop


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


def ensure(policy: WaitPolicy) -> None:
    """When this process started torch with another policy than `policy` (too late to change: libgomp
    has read its environment), run the same `python -m sasgate.stages.<name>` again under `policy`."""
    retried = os.environ.pop(REEXEC, None)
    if started_with() == policy:
        return
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if retried or spec is None or not spec.name.startswith("sasgate.stages."):
        raise ParamsError(f"runtime.omp_wait_policy {policy!r} cannot be applied in this process (torch loaded "
                          f"with {started_with()!r}); run the stage as `python -m sasgate.stages.<name>`")
    env = apply(policy, dict(os.environ))
    env[REEXEC] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", spec.name, *sys.argv[1:]], env)


def record() -> dict:
    """What the run log keeps: the policy and the variables libgomp read."""
    return {"omp_wait_policy": started_with(), "omp_env": {v: os.environ.get(v) for v in VARS}}
