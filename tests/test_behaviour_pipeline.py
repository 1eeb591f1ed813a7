"""End to end: the behaviour half of the pipeline under the real `dvc repro`, on the shared SMALL project.

Every test reads the session's `reproduced_small` or changes a private copy of it, by params (or, for the
tamper check, by editing a released scorer file) only; `dvc repro <stage>` then re-runs just what changed.
"""

from __future__ import annotations

import json

import pytest
import yaml

from projects import copy_project, dvc, merge
from sasgate.artifacts import sha256_file

pytestmark = pytest.mark.slow

BEHAVIOUR_STAGES = ("directions", "features", "calibrate", "steer", "score", "validity", "stability")


def read(root, rel):
    return json.loads((root / rel).read_text())


def set_params(root, over):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merge(raw, over), sort_keys=False))


def test_small_pipeline_runs_the_behaviour_stages_and_both_gates_pass(reproduced_small):
    from sasgate.artifacts import verify_manifest

    root = reproduced_small
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(BEHAVIOUR_STAGES) <= set(lock)
    for stage in BEHAVIOUR_STAGES:
        assert verify_manifest(root / "manifests" / f"{stage}.json", root) == [], stage
    gate = read(root, "gates/behaviour.json")
    assert gate["status"] == "pass" and gate["outcome"] in ("holds", "fails", "inconclusive")
    assert [(c["kind"], c["operator"]) for c in gate["comparisons"]] == [("induce", "addition"),
                                                                         ("bypass", "directional_ablation")]
    assert all(c["n_units"] == 8 and c["strength_chosen_on"] == "selection" for c in gate["comparisons"])
    stability = read(root, "gates/stability.json")
    assert stability["status"] == "pass" and len(stability["details"]["cells"]) == 4  # 2 seeds x 2 paraphrase sets
    assert len(stability["details"]["split_half"]) == 2
    # the organism's refusal direction is real: DIM moves refusal both ways on the eval split
    acceptance = read(root, "metrics/score.json")["acceptance"]
    assert acceptance["dim_add_harmless_increase_pp"] >= 50 and acceptance["dim_ablate_harmful_decrease_pp"] >= 25
    strengths = read(root, "artifacts/calibrate/strengths.json")
    side = read(root, "artifacts/steer/side_effects.json")
    assert side["strengths_sha256"] == sha256_file(root / "artifacts/calibrate/strengths.json")
    assert {(s["arm"], s["strength"]) for s in side["settings"]} >= {("dim_add", 2.0), ("sas_latent_ablate", 1.0)}
    assert all(s["kl"]["harmless"] >= 0 and s["kl"]["harmful"] >= 0 for s in side["settings"])
    assert {c["strength"] for c in strengths["choices"].values()} <= {None, 0.5, 1.0, 2.0}
    # every eval generation is on the eval split; every calibration generation on the selection split
    rows = [json.loads(line) for line in (root / "artifacts/steer/generations.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"eval"} and {r["seed"] for r in rows} == {0, 1}
    cal = [json.loads(line) for line in (root / "artifacts/calibrate/scores.jsonl").read_text().splitlines()]
    assert {r["split"] for r in cal} == {"selection"}


def test_validity_gate_fails_on_v1_and_on_min_samples_above_the_data(reproduced_small, tmp_path):
    root = copy_project(reproduced_small, tmp_path / "p")
    set_params(root, {"score": {"version": "v1"}})
    dvc(root, "repro", "validity")
    gate = read(root, "gates/behaviour.json")
    assert gate["status"] == "fail" and gate["details"]["checks"]["scorer_agreement"]["pass"] is False
    assert "scorer v1 agrees with the check set" in gate["reason"]

    # SMALL has 32 generations per condition but 8 source prompts: the resampling unit is the source.
    # (The strengths are chosen with the scorer, so v1 re-ran calibrate; a fresh copy is on v2.)
    root = copy_project(reproduced_small, tmp_path / "q")
    set_params(root, {"validity": {"min_samples": 9}})
    res = dvc(root, "repro", "validity")
    assert "Running stage 'steer'" not in res.stdout and "Running stage 'calibrate'" not in res.stdout
    gate = read(root, "gates/behaviour.json")
    assert gate["status"] == "fail" and read(root, "metrics/validity.json")["failed_checks"] == ["min_samples"]
    assert "8 source prompts, fewer than 9" in gate["reason"]


def test_editing_a_released_scorer_makes_scoring_fail_with_exit_7(reproduced_small, tmp_path):
    root = copy_project(reproduced_small, tmp_path / "p")
    v1 = root / "sasgate" / "scorer_versions" / "v1.py"
    v1.write_text(v1.read_text().replace('"I cannot",', '"I cannot",\n    "i cannot",'))
    res = dvc(root, "repro", "score", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "exited with 7" in out
    # calibrate (strengths chosen on selection) is the first stage to score, so it is the one that refuses
    assert "sasgate calibrate: error: scorer v1:" in out and "released scorer versions are immutable" in out
    assert "add a new version (v3.py)" in out
    assert not (root / "artifacts" / "calibrate").exists()  # DVC removed the old strengths; nothing new written


def test_plots_show_writes_one_page_with_every_behaviour_plot(reproduced_small, tmp_path):
    res = dvc(reproduced_small, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "index.html" in res.stdout + res.stderr
    for title in ("Induce: refusal rate on harmless eval prompts", "Bypass: refusal rate on harmful eval prompts",
                  "Stability:", "Scorer agreement with the labelled check set", "Side effects"):
        assert title in page, title
    assert '"type": "errorband"' in page  # the CI bands of .dvc/plots/ci_band.json
    induce = read(reproduced_small, "plots/steering_induce.json")
    assert [(r["method"], r["strength"]) for r in induce] == [
        (m, c) for m in ("DIM addition", "SAS addition") for c in (0.0, 0.5, 1.0, 2.0)]
    assert all(r["lo"] <= r["rate"] <= r["hi"] for r in induce)
