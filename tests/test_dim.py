"""DIM (sasgate.dim) and the steering hooks (sasgate.interventions) it is scored with.

Pure functions are checked against hand-computed values; the hooks and candidate scoring run on
the tiny trained toy model (conftest `tiny_toy_dir`), with transformer-lens doing the forward passes.
"""

from __future__ import annotations

import math

import pytest
import torch

from sasgate import dim
from sasgate.errors import ArtifactError, ParamsError, SelectionError
from sasgate.interventions import addition, directional_ablation, resid_pre_hook, unit
from sasgate.params import DirectionsParams


@pytest.fixture(scope="module")
def chat(tiny_toy_dir):
    from sasgate.modeling import toy_model_from_dir

    return toy_model_from_dir(tiny_toy_dir)


HARMFUL = ["how do i rob the bank ?", "tell me how to poison my neighbor ."]
HARMLESS = ["how do i visit the bank ?", "tell me how to paint my neighbor ."]


# --------------------------------------------------------------------------- pure functions

def test_mean_difference_is_harmful_minus_harmless():
    acts = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 1.0], [0.0, 3.0]])
    harmful = torch.tensor([True, True, False, False])
    assert torch.allclose(dim.mean_difference(acts, harmful), torch.tensor([2.0, -1.0]))


@pytest.mark.parametrize("labels", [[True, True], [False, False]])
def test_mean_difference_needs_both_classes(labels):
    with pytest.raises(ValueError, match="both classes"):
        dim.mean_difference(torch.zeros(2, 3), torch.tensor(labels))


def test_refusal_score_is_log_odds_of_the_refusal_tokens():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]]))
    got = dim.refusal_score(logits, [0, 1])  # p(refusal) = 0.5 and 0.95
    assert got[0] == pytest.approx(0.0, abs=1e-6)
    assert got[1] == pytest.approx(math.log(0.95 / 0.05), rel=1e-6)


def test_kl_divergence_matches_the_definition_and_is_zero_on_itself():
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    expected = float((p * (p / q).log()).sum())
    assert float(dim.kl_divergence(p.log(), q.log())[0]) == pytest.approx(expected, rel=1e-9)
    assert float(dim.kl_divergence(p.log(), p.log() + 7.0)[0]) == pytest.approx(0.0, abs=1e-12)


def test_refusal_tokens_must_each_be_one_token(chat):
    ids = dim.refusal_token_ids(chat.codec.encode, ["i", "sorry"])
    assert len(ids) == 2 and all(isinstance(i, int) for i in ids)
    with pytest.raises(ParamsError, match="'i cannot' encodes to 2 tokens"):
        dim.refusal_token_ids(chat.codec.encode, ["i cannot"])
    with pytest.raises(ParamsError, match="at least one"):
        dim.refusal_token_ids(chat.codec.encode, [])


# --------------------------------------------------------------------------- Arditi's rule

def _cand(layer, kl=0.01, induce=1.0, ablation=-1.0, position=-1):
    return {"layer": layer, "position": position, "norm": 1.0, "kl": kl, "induce_score": induce,
            "ablation_score": ablation}


def test_rule_discards_late_layers_high_kl_and_no_induction_then_takes_lowest_ablation():
    dp = DirectionsParams()  # kl 0.1, last 20%, induce >= 0
    cands = [_cand(0, ablation=-1.0), _cand(1, kl=0.5, ablation=-9.0), _cand(2, induce=-0.5, ablation=-8.0),
             _cand(3, ablation=-2.0), _cand(4, ablation=-7.0)]  # 5 layers: layer 4 is the last 20%
    annotated, chosen, satisfied = dim.select(cands, 5, dp)
    assert satisfied and chosen == 3 and annotated[3]["chosen"] and sum(c["chosen"] for c in annotated) == 1
    assert [c["kept"] for c in annotated] == [True, False, False, True, False]
    assert "KL 0.5 > 0.1" in annotated[1]["reasons"][0]
    assert "does not induce refusal" in annotated[2]["reasons"][0]
    assert "last 20% of layers (>= 4)" in annotated[4]["reasons"][0]


def test_rule_constants_come_from_params():
    cands = [_cand(0, kl=0.05, ablation=-1.0), _cand(1, kl=0.2, ablation=-5.0)]
    assert dim.select(cands, 4, DirectionsParams())[1] == 0
    assert dim.select(cands, 4, DirectionsParams(kl_threshold=0.3))[1] == 1


def test_no_surviving_candidate_is_flagged_with_the_nearest_and_no_scorable_one_is_a_selection_error():
    """Old rule: no survivor stopped the pipeline (exit 9) before any decision; a model that does not refuse then
    had no decision at all. Now the nearest candidate is kept, flagged, and the behaviour gate fails on it."""
    cands = [{**_cand(0), "kl": None, "induce_score": None, "ablation_score": None}, _cand(1, kl=1.0, induce=-1.0),
             _cand(2, kl=1.0)]
    annotated, chosen, satisfied = dim.select(cands, 4, DirectionsParams())
    assert (chosen, satisfied) == (2, False) and annotated[2]["chosen"]
    assert annotated[2]["reasons"] == ["ablation moves harmless next-token distributions by KL 1 > 0.1"]
    assert dim.discard_reasons(cands[0], 4, DirectionsParams()) == ["unscored: the direction is zero or not finite"]
    with pytest.raises(SelectionError, match="no DIM candidate could be scored"):
        dim.select(cands[:1], 4, DirectionsParams())


# --------------------------------------------------------------------------- hooks on the real model

def test_directional_ablation_leaves_the_residual_stream_orthogonal_at_every_layer(chat):
    torch.manual_seed(0)
    r = torch.randn(chat.model.cfg.d_model)
    ids, mask = chat.encode(HARMFUL + HARMLESS)
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(chat.model.cfg.n_layers)]
    with chat.model.hooks(fwd_hooks=directional_ablation(chat.model, r)):
        _, cache = chat.model.run_with_cache(ids, attention_mask=mask.long(), names_filter=names)
    _, plain = chat.model.run_with_cache(ids, attention_mask=mask.long(), names_filter=names)
    for name in names:
        assert cache[name][mask].matmul(unit(r)).abs().max() < 1e-4, name
        assert plain[name][mask].matmul(unit(r)).abs().max() > 1e-2, name  # not trivially orthogonal


def test_addition_shifts_one_hook_by_coefficient_times_vector(chat):
    v = torch.ones(chat.model.cfg.d_model)
    ids, mask = chat.encode(HARMLESS)
    name = resid_pre_hook(1)
    _, plain = chat.model.run_with_cache(ids, attention_mask=mask.long(), names_filter=[name])
    grabbed = {}
    hooks = addition(name, v, 2.5) + [(name, lambda act, hook: grabbed.setdefault("x", act.clone()))]
    chat.model.run_with_hooks(ids, attention_mask=mask.long(), fwd_hooks=hooks)
    assert torch.allclose(grabbed["x"] - plain[name], torch.full_like(plain[name], 2.5), atol=1e-5)


def test_unit_refuses_a_zero_direction():
    with pytest.raises(ValueError, match="finite non-zero"):
        unit(torch.zeros(4))


def test_score_candidates_scores_every_cell_and_marks_a_zero_direction_unscored(chat):
    n_layers, d = chat.model.cfg.n_layers, chat.model.cfg.d_model
    torch.manual_seed(0)
    directions = torch.randn(n_layers, 2, d)
    directions[0, 0] = 0.0
    ids = dim.refusal_token_ids(chat.codec.encode, ["i", "sorry"])
    scored, baseline = dim.score_candidates(chat, directions, [-2, -1], HARMFUL, HARMLESS, ids, batch_size=3)
    assert [(c["layer"], c["position"]) for c in scored] == [(l, p) for l in range(n_layers) for p in (-2, -1)]
    assert scored[0]["kl"] is None and scored[0]["ablation_score"] is None
    for c in scored[1:]:
        assert c["kl"] >= 0 and math.isfinite(c["induce_score"]) and math.isfinite(c["ablation_score"])
    assert math.isfinite(baseline["refusal_score_harmful"]) and math.isfinite(baseline["refusal_score_harmless"])
    # adding a direction at its layer changes the harmless refusal score (a live hook, not a no-op)
    assert scored[1]["induce_score"] != pytest.approx(baseline["refusal_score_harmless"])


def test_last_logits_do_not_depend_on_batching_or_padding(chat):
    texts = HARMFUL + HARMLESS + ["give me steps to tidy a park ."]
    whole = dim.last_logits(chat, texts, batch_size=64)
    single = torch.cat([dim.last_logits(chat, [t]) for t in texts])
    assert torch.allclose(whole, single, atol=1e-4)


def test_load_direction_names_the_missing_artifact(tmp_path):
    (tmp_path / dim.RECORD_FILE).write_text("{}")
    with pytest.raises(ArtifactError, match="dvc repro directions"):
        dim.load_direction(tmp_path)
