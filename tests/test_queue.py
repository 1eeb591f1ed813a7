"""Sweeps on DVC's own queue: a 2-point grid queued with one `dvc exp run --queue -S KEY=A,B`, run by
`dvc queue start -j 2`, compared with `dvc exp show` (README, "Sweeps on DVC's queue")."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from projects import copy_project, dvc, env, sh

GRID = ("features.top_k", (2, 6))
DEADLINE_S = 1500


def _experiments(root) -> list[dict]:
    """`dvc exp show --json` flattened: one {name, params, metrics} per experiment of the baseline."""
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    out = []
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                out.append({"name": exp.get("name") or rev.get("name"),
                            "params": data.get("params", {}).get("params.yaml", {}).get("data", {}),
                            "metrics": {k: v.get("data", {}) for k, v in (data.get("metrics") or {}).items()}})
    return out


@pytest.mark.slow
def test_two_point_grid_on_the_queue(reproduced_small, tmp_path):
    root = copy_project(reproduced_small, tmp_path / "sweep")
    sh(["git", "add", "-A"], root)  # the reproduced state is the sweep's baseline commit
    sh(["git", "commit", "-q", "-m", "reproduced baseline"], root)
    key, values = GRID
    dvc(root, "exp", "run", "--queue", "-S", f"{key}={','.join(map(str, values))}")  # Hydra sweep syntax
    queued = dvc(root, "queue", "status").stdout
    assert queued.count("Queued") == len(values), queued
    # `queue start` detaches its workers, and they inherit its stdout: read through a pipe, the call would
    # wait for the workers to exit (minutes of idle time), so its output goes to a file
    log = tmp_path / "queue-start.log"
    with log.open("w") as out:
        started = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=root, env=env(),
                                 stdout=out, stderr=subprocess.STDOUT)
    assert started.returncode == 0, log.read_text()
    deadline = time.monotonic() + DEADLINE_S
    while True:
        status = dvc(root, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, f"the queue did not finish in {DEADLINE_S} s:\n{status}"
        time.sleep(5)
    assert status.count("Success") == len(values), status
    dvc(root, "queue", "stop", check=False)

    exps = _experiments(root)
    section, name = key.split(".")
    got = sorted(e["params"][section][name] for e in exps)
    assert got == sorted(values), exps
    features = [e["metrics"].get("metrics/features.json") for e in exps]
    assert all(features) and features[0] != features[1], "the grid points should give different SAS features"
    table = dvc(root, "exp", "show", "--md").stdout
    assert key in table
