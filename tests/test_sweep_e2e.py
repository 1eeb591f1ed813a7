"""`sasgate sweep` on the real pipeline (the SMALL project after `dvc repro`): a 2-point grid through
submitit's local executor, and the same sweep on a real single-node Slurm (slurmctld + slurmd + munge on
this machine; tests/slurm/start.sh, which .ci/run calls) when one answers; a bare git remote and a DVC folder
remote carry everything between the jobs and the workspace."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from click.testing import CliRunner
from projects import GIT_ENV, copy_project, dvc, lock_out_hashes, sh

from sasgate.cli import main
from sasgate.sweep.job import lock_hashes

GRID = ("features.top_k", (2, 6))
# What features.top_k reaches (dvc.yaml); `params` reruns because it reads the whole params.yaml (its output
# is a constant stamp, so nothing downstream reruns because of it).
REACHED = {"params", "features", "calibrate", "steer", "score", "validity", "stability", "decide", "report"}


def slurm_reason() -> str | None:
    """Why no Slurm can take the sweep here, or None when one answers."""
    if not shutil.which("sbatch"):
        return "no sbatch on PATH (Debian: apt-get install slurm-wlm munge; tests/slurm/start.sh starts it)"
    try:
        res = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if res.returncode != 0 or not any(s in res.stdout for s in ("idle", "mixed", "allocated")):
        return f"no Slurm node is up (sinfo: {(res.stdout + res.stderr).strip()[:200]!r}); tests/slurm/start.sh starts one"
    return None


@pytest.fixture
def baseline(reproduced_small, tmp_path, monkeypatch):
    """A copy of the reproduced SMALL project, committed, pushed to a bare git remote and a DVC folder remote."""
    for k, v in GIT_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("PYTHONSAFEPATH", "1")  # the jobs' stages import the checkout under test (tests/projects.py)
    root = copy_project(reproduced_small, tmp_path / "project")
    dvc(root, "remote", "add", "-d", "store", str(tmp_path / "dvc-store"))
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "reproduced baseline"], root)
    dvc(root, "push")
    sh(["git", "init", "-q", "--bare", str(tmp_path / "remote.git")], tmp_path)
    sh(["git", "remote", "add", "origin", str(tmp_path / "remote.git")], root)
    sh(["git", "push", "-q", "origin", "main"], root)
    monkeypatch.chdir(root)
    return root


def sweep_and_check(root, *flags: str) -> None:
    key, values = GRID
    run = CliRunner().invoke(main, ["sweep", "submit", "-S", f"{key}={','.join(map(str, values))}", *flags],
                             catch_exceptions=False)
    assert run.exit_code == 0, run.output
    res = CliRunner().invoke(main, ["sweep", "collect", "--wait", "--timeout", "2400", "--json"], catch_exceptions=False)
    out = json.loads(res.stdout)
    assert res.exit_code == 0, json.dumps(out, indent=1)[-3000:]
    baseline = lock_out_hashes(root)
    results = [p["result"] for p in out["points"]]
    for p, value in zip(results, values):
        assert set(p["stages_run"]) <= REACHED and {"features", "steer"} <= set(p["stages_run"]), p["stages_run"]
        pulled = lock_hashes(sh(["git", "show", f"{p['commit']}:dvc.lock"], root).stdout)
        assert pulled == p["outs"], "the experiment pulled back is the one its job computed"
        for out_key in ("model:artifacts/model", "collect:artifacts/collect", "saes:artifacts/saes"):
            assert p["outs"][out_key] == baseline[out_key], f"{out_key} is the baseline's"
        dvc(root, "exp", "apply", p["name"])  # its outputs came into the local cache: applied, nothing is stale
        assert json.loads(dvc(root, "status", "--json").stdout) == {}
        params = yaml.safe_load((root / "params.yaml").read_text())
        assert params["features"]["top_k"] == value
        sh(["git", "reset", "-q", "--hard"], root)
        dvc(root, "checkout", "--force")
    assert results[0]["outs"]["features:artifacts/features"] != results[1]["outs"]["features:artifacts/features"]
    assert key in out["table"]


@pytest.mark.slow
def test_two_point_sweep_of_the_pipeline_on_the_local_executor(baseline):
    sweep_and_check(baseline, "--executor", "local")


@pytest.mark.slow
@pytest.mark.skipif(slurm_reason() is not None, reason=f"no Slurm here: {slurm_reason()}")
def test_two_point_sweep_of_the_pipeline_on_slurm(baseline):
    sweep_and_check(baseline, "--executor", "slurm", "--time-min", "60")
