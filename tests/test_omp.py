"""OpenMP's wait policy (sasgate/omp.py): in the environment before torch loads, as params ask, and in the run log.

Each stage run here is a real `python -m sasgate.stages.params` process (the cheapest stage; it makes torch
deterministic like every other)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from projects import REPO

from sasgate import omp
from sasgate.errors import ParamsError
from sasgate.params import parse_params


def test_apply_sets_exactly_the_policy_and_marks_it():
    env = omp.apply("passive", {"OMP_WAIT_POLICY": "ACTIVE", "KEEP": "1"})
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KEEP": "1", omp.MARKER: "passive"}
    env = omp.apply("unset", env)
    assert env == {"KEEP": "1", omp.MARKER: "unset"}


def test_the_policy_is_a_typed_param():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert parse_params(raw).runtime.omp_wait_policy == "passive"
    raw["runtime"]["omp_wait_policy"] = "spin"
    with pytest.raises(ParamsError, match="runtime.omp_wait_policy"):
        parse_params(raw)


def _stage(root, policy: str | None, **env: str) -> dict:
    """Run the `params` stage in root with runtime.omp_wait_policy = policy (None: the default); its run-log entry."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    if policy is not None:
        raw["runtime"]["omp_wait_policy"] = policy
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    base = {k: v for k, v in os.environ.items() if k not in (*omp.VARS, omp.MARKER)}
    res = subprocess.run([sys.executable, "-m", "sasgate.stages.params"], cwd=root, env={**base, **env},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads((root / "logs" / "runs.jsonl").read_text().splitlines()[-1])


def test_a_stage_starts_torch_with_the_policy_params_ask_for(tmp_path):
    logged = _stage(tmp_path, None)
    assert logged["omp_wait_policy"] == "passive"
    assert logged["omp_env"] == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    assert logged["threads"] == yaml.safe_load((REPO / "params.yaml").read_text())["runtime"]["threads"]

    # params say unset while the shell exported a passive policy: the stage re-runs itself without it
    logged = _stage(tmp_path, "unset", OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="0")
    assert (logged["omp_wait_policy"], logged["omp_env"]) == ("unset", {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None})

    # a parent that chose another policy (the marker) does not win over params either
    logged = _stage(tmp_path, "passive", **omp.apply("unset", {}))
    assert (logged["omp_wait_policy"], logged["omp_env"]["OMP_WAIT_POLICY"]) == ("passive", "PASSIVE")
