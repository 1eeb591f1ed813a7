"""submitit executors for a sweep, and the state of a submitted point.

A point's state is read from what survives the submitting process: submitit's result file in the
sweep's job folder (written by the job when it ends, with its value or its traceback), else whether
the job is still alive (the local controller's process, or Slurm's queue). A job that is gone without
a result (killed, out of time, its node lost) has failed: never "still running" forever.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from ..errors import SweepError
from .settings import SweepParams

State = Literal["succeeded", "failed", "running"]
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


@dataclass(frozen=True)
class JobState:
    state: State
    result: dict | None  # the job's return value when it succeeded
    error: str | None  # the end of its traceback, or why it is counted as failed
    log: Path  # the job's stdout (commands and their output)
    err_log: Path  # its stderr (the traceback)


def executor(settings: SweepParams, folder: Path, name: str):
    """A submitit executor for `settings.executor`, writing pickles, results and logs in `folder`."""
    import submitit

    if settings.executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=settings.time_min, gpus_per_node=settings.gpus_per_node)
        return ex
    ex = submitit.SlurmExecutor(folder=folder)
    s = settings.slurm
    extra: dict[str, Any] = {k: v for k, v in {"partition": s.partition, "account": s.account}.items() if v}
    if s.mem_gb is not None:
        extra["mem"] = f"{int(s.mem_gb * 1024)}M"
    if settings.gpus_per_node:
        extra["gpus_per_node"] = settings.gpus_per_node
    ex.update_parameters(job_name=name, time=settings.time_min, cpus_per_task=settings.cpus_per_task,
                         array_parallelism=s.array_parallelism, setup=list(s.setup), **extra)
    return ex


def submit(settings: SweepParams, folder: Path, name: str, fn: Callable, specs: list) -> list[str]:
    """Submit fn(spec) for every spec as one job array; the job ids, in the order of `specs`."""
    try:
        jobs = executor(settings, folder, name).map_array(fn, specs)
    except Exception as exc:  # sbatch missing or refusing, an unpicklable spec: say which
        raise SweepError(f"could not submit {len(specs)} job(s) to {settings.executor}: {exc}") from None
    return [str(j.job_id) for j in jobs]


def _alive(kind: str, job_id: str) -> bool:
    if kind == "local":  # the job id is the controller's pid; a zombie has ended
        try:
            stat = Path(f"/proc/{int(job_id)}/stat").read_text()
        except (OSError, ValueError):
            return False
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"
    try:
        res = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SweepError(f"cannot ask Slurm about job {job_id}: {exc}") from None
    if res.returncode != 0:  # squeue answers "Invalid job id" for a job it no longer knows
        if "invalid job id" in res.stderr.lower():
            return False
        raise SweepError(f"squeue failed for job {job_id}: {res.stderr.strip()}")
    return bool(res.stdout.strip())


def _summary(traceback: str, max_lines: int = 12) -> str:
    """The exception line of a traceback and what follows it (a SweepError's command output tail)."""
    lines = traceback.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    return "\n".join(lines[starts[-1] if starts else -3:][:max_lines])


def state(kind: str, folder: Path, job_id: str) -> JobState:
    from submitit.core.utils import JobPaths, pickle_load

    paths = JobPaths(folder, job_id=job_id, task_id=0)

    def finished() -> JobState | None:
        if not paths.result_pickle.exists():
            return None
        try:
            outcome, value = pickle_load(paths.result_pickle)
        except Exception as exc:  # a truncated or foreign file: the point did not come back
            return JobState("failed", None, f"unreadable result {paths.result_pickle}: {exc}", paths.stdout,
                            paths.stderr)
        if outcome == "success" and isinstance(value, dict):
            return JobState("succeeded", value, None, paths.stdout, paths.stderr)
        return JobState("failed", None, _summary(str(value)), paths.stdout, paths.stderr)

    done = finished()
    if done:
        return done
    alive = _alive(kind, job_id)
    done = finished()  # it may have ended between the two looks
    if done:
        return done
    if alive:
        return JobState("running", None, None, paths.stdout, paths.stderr)
    return JobState("failed", None, "the job ended without a result (killed, out of time, or its node was lost)",
                    paths.stdout, paths.stderr)
