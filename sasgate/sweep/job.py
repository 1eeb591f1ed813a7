"""One point of a sweep, as a submitit job runs it (on a Slurm node, or here).

Nothing is shared with the submitting workspace but the two remotes: the job clones the git remote
at the sweep's commit into a scratch folder, makes the sweep's DVC remote its default, runs
`dvc exp run --pull` (DVC pulls the outputs of the stages the point leaves unchanged and reruns
the ones its params reach), pushes the experiment (`dvc exp push`: the git ref to the git remote,
its outputs to the DVC remote) and returns what it computed, so `collect` can check that what comes
back is that. Every command and its output go to the job's log.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from ..errors import SweepError

RUNNING = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)
TAIL_LINES = 20


class PointSpec(BaseModel):
    """Everything a job needs, pickled by submitit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    overrides: list[str]
    commit: str
    git_url: str
    dvc_remote: str
    dvc_url: str
    scratch: str | None = None


def tool_env() -> dict[str, str]:
    """This process's environment with its interpreter's folder first on PATH, so `python` in
    dvc.yaml and `dvc` are the ones sasgate runs in."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run(args: list[str], cwd: Path, echo: bool = True) -> str:
    """Run one command; a failure is a SweepError naming the command with the end of its output.

    echo: its output (stderr merged) streams to the log as it comes, and comes back; otherwise
    its stdout alone comes back, for parsing.
    """
    if echo:
        print(f"$ {' '.join(args)}", flush=True)
        with subprocess.Popen(args, cwd=cwd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            lines = []
            for line in proc.stdout:  # type: ignore[union-attr]
                print(line, end="", flush=True)
                lines.append(line)
        code = proc.returncode
        out = shown = "".join(lines)
    else:
        res = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True)
        code, out, shown = res.returncode, res.stdout, res.stdout + res.stderr
    if code != 0:
        tail = "\n".join(shown.strip().splitlines()[-TAIL_LINES:])
        raise SweepError(f"`{' '.join(args)}` failed (exit {code}) in {cwd}:\n{tail}")
    return out


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def lock_hashes(lock_text: str) -> dict[str, str]:
    """{"stage:out path": md5} of a dvc.lock."""
    lock = yaml.safe_load(lock_text) or {}
    return {f"{name}:{o['path']}": o["md5"] for name, st in (lock.get("stages") or {}).items()
            for o in st.get("outs", [])}


def exp_ref(repo: Path, name: str) -> tuple[str, str]:
    """(ref, commit) of the experiment `name` in `repo` (refs/exps/<baseline>/<name>)."""
    listed = run(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], repo, echo=False)
    found = [line.split() for line in listed.splitlines() if line.split()[0].rsplit("/", 1)[-1] == name]
    if len(found) != 1:
        raise SweepError(f"expected one experiment ref named {name!r} in {repo}, found {len(found)}")
    return found[0][0], found[0][1]


def run_point(spec: PointSpec) -> dict:
    """Clone, pull, `dvc exp run`, push; returns {name, commit, ref, stages_run, outs}."""
    scratch = Path(tempfile.mkdtemp(prefix=f"sasgate-{spec.name}-", dir=spec.scratch))
    repo = scratch / "repo"
    try:
        run(["git", "clone", "--quiet", "--no-checkout", spec.git_url, str(repo)], scratch)
        run(["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", spec.commit], repo)
        run(dvc("remote", "add", "--local", "--force", "--default", spec.dvc_remote, spec.dvc_url), repo)
        sets = [a for o in spec.overrides for a in ("-S", o)]
        out = run(dvc("exp", "run", "--pull", "--name", spec.name, *sets), repo)
        ref, commit = exp_ref(repo, spec.name)
        outs = lock_hashes(run(["git", "show", f"{commit}:dvc.lock"], repo, echo=False))
        run(dvc("exp", "push", "--force", "--remote", spec.dvc_remote, "origin", spec.name), repo)
        return {"name": spec.name, "commit": commit, "ref": ref, "stages_run": RUNNING.findall(out), "outs": outs}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
