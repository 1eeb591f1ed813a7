"""End-to-end: the real `dvc repro` in real git repos, on a small config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from sasgate.artifacts import verify_manifest

from projects import SMALL, copy_project, dvc, lock_out_hashes, make_project, merge, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, reproduced_small):
    """A private copy of the session's reproduced SMALL project, shared by this module's tests."""
    return copy_project(reproduced_small, tmp_path_factory.mktemp("a") / "proj")


def set_params(root, over):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merge(raw, over), sort_keys=False))


def test_two_fresh_clones_give_identical_dvc_lock(built, tmp_path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(built), str(clone)], tmp_path)
    dvc(clone, "repro")
    a, b = lock_out_hashes(built), lock_out_hashes(clone)
    assert set(a) >= {"collect:artifacts/collect", "saes:artifacts/saes", "reconstruction:gates/reconstruction.json",
                      "directions:artifacts/directions", "features:artifacts/features", "steer:artifacts/steer",
                      "score:artifacts/score", "validity:gates/behaviour.json", "stability:gates/stability.json"}
    assert a == b


def test_second_repro_is_a_no_op(built):
    res = dvc(built, "repro")
    assert "Data and pipelines are up to date" in res.stdout + res.stderr


def test_manifests_match_artifacts(built):
    for stage in ("model", "collect", "saes", "reconstruction"):
        assert verify_manifest(built / "manifests" / f"{stage}.json", built) == [], stage


def test_gate_passes_and_fails_by_threshold_only(built):
    statuses = {}
    for threshold in (10.0, 0.0):
        set_params(built, {"reconstruction": {"threshold": threshold}})
        res = dvc(built, "repro", "reconstruction")  # (remediation refuses a threshold changed after preregistration)
        assert "Running stage 'collect'" not in res.stdout  # only the gate re-runs
        statuses[threshold] = json.loads((built / "gates" / "reconstruction.json").read_text())["status"]
    assert statuses == {10.0: "pass", 0.0: "fail"}
    sh(["git", "checkout", "params.yaml"], built)


def test_an_extra_criterion_fails_a_tuple_that_passes_on_nmse_and_a_record_claiming_otherwise_exits_11(built):
    """Issue 15's acceptance: nMSE passes every tuple (threshold 10), `kl_div_score >= 0.99` fails at least one,
    and the record names the failed criterion; a record flipped to pass is refused by `decide` (exit 11)."""
    from sasgate.artifacts import canonical_json

    crit = [{"metric": "kl_div_score", "comparison": ">=", "threshold": 0.99}]
    set_params(built, {"reconstruction": {"threshold": 10.0, "criteria": crit}})
    res = dvc(built, "repro", "reconstruction")  # (remediation refuses criteria changed after preregistration)
    assert "Running stage 'collect'" not in res.stdout
    path = built / "gates" / "reconstruction.json"
    rec = json.loads(path.read_text())
    assert rec["status"] == "fail"
    failed = [r for r in rec["per_tuple"] if r["status"] == "fail"]
    assert failed and all(r["criteria"][0]["metric"] == "nmse" and r["criteria"][0]["pass"] for r in rec["per_tuple"])
    for r in failed:
        assert r["criteria"][1] == {"metric": "kl_div_score", "comparison": ">=", "threshold": 0.99,
                                    "observed": r["metrics"]["kl_div_score"], "pass": False}
        assert r["metrics"]["kl_div_score"] < 0.99 and r["extra"]["failed_criteria"] == ["kl_div_score"]
        assert f"{r['extra']['key']}: kl_div_score" in rec["reason"]
    assert "but other criteria fail" in rec["reason"]
    plot = json.loads((built / "plots" / "reconstruction.json").read_text())
    assert [p["status"] for p in plot] == [r["status"] for r in rec["per_tuple"]]
    # hostile: the failing rows flipped to pass, the record rewritten in canonical form
    for r in rec["per_tuple"]:
        r["status"] = "pass"
    rec["status"] = "pass"
    path.write_text(canonical_json(rec))
    res = sh([sys.executable, "-m", "sasgate.stages.decide"], built, check=False)
    assert res.returncode == 11, res.stderr
    assert "reconstruction gate record" in res.stderr and "its criteria give 'fail'" in res.stderr
    sh(["git", "checkout", "params.yaml"], built)


@pytest.mark.parametrize("over, named", [
    ({"collect": {"batch_sise": 8}}, "collect.batch_sise"),
    ({"reconstruction": {"threshold": -1}}, "reconstruction.threshold"),
    ({"tuples": [{"layer": 5, "site": "resid_post", "sae": "train"}]}, "tuples[0].layer = 5"),
])
def test_bad_params_stop_dvc_repro_before_any_compute(tmp_path, over, named):
    root = make_project(tmp_path / "p", merge(SMALL, over), lock=False)
    res = dvc(root, "repro", check=False)
    assert res.returncode != 0
    assert named in res.stderr + res.stdout
    assert not (root / "artifacts" / "model").exists()


def test_changed_eval_prompt_is_refused_until_relocked(tmp_path):
    over = merge(SMALL, {"eval": {"source": "builtin"}})
    root = make_project(tmp_path / "p", over)
    harmful = root / "data" / "eval" / "harmful.jsonl"
    rows = [json.loads(line) for line in harmful.read_text().splitlines()]
    for row in rows:  # reword every source: the resolved set samples some of them
        row["instruction"] += " Be thorough."
    harmful.write_text("".join(json.dumps(row) + "\n" for row in rows))
    res = dvc(root, "repro", "collect", check=False)
    assert res.returncode != 0
    assert "locked evaluation setup" in res.stderr + res.stdout
    assert not (root / "artifacts" / "collect").exists()
    sh([sys.executable, "-m", "sasgate.cli", "lock", "--reason", "reworded the harmful prompts"], root)
    dvc(root, "repro", "collect")
    assert (root / "artifacts" / "collect" / "eval" / "tokens.safetensors").is_file()


def test_sigkilled_collect_leaves_nothing_that_passes_for_complete(tmp_path):
    root = make_project(tmp_path / "p", merge(SMALL, {"eval": {"n_eval": 64}}))
    dvc(root, "repro", "model")
    from projects import env

    proc = subprocess.Popen([sys.executable, "-m", "sasgate.stages.collect"], cwd=root, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((root / "artifacts").glob(".collect.tmp-*/selection/*.safetensors")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "artifacts" / "collect").exists()
    status = dvc(root, "status", "collect")
    assert "collect" in status.stdout and "up to date" not in status.stdout
    dvc(root, "repro", "collect")  # collect again: complete, and what its manifest says
    assert verify_manifest(root / "manifests" / "collect.json", root) == []
    assert "up to date" in dvc(root, "status", "collect").stdout
