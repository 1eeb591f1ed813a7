"""The reconstruction ("unlock") gate: nMSE per required tuple on the eval split, vs a threshold.

Tiny activation files are written in the store's format (sasgate.activations), and each
tuple's SAE is trained with sae-lens on other draws from the same synthetic distribution.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from sasgate import sae_io
from sasgate.errors import ArtifactError
from sasgate.gates import read_gate
from sasgate.nmse import bootstrap_nmse, evaluate, nmse_from_stats, prompt_stats
from sasgate.params import parse_params
from sasgate.paths import Paths

D = 32
RAW = {
    "model": {"toy": {"n_layers": 2, "d_model": D, "n_heads": 2, "d_mlp": 64, "n_ctx": 48, "corpus_size": 400,
                      "train_steps": 60, "batch_size": 32, "lr": 0.003, "n_validation": 4}},
    "eval": {"n_selection": 4, "n_eval": 8, "n_paraphrases": 1},
    "tuples": [{"layer": 0, "site": "resid_pre", "sae": "train"}, {"layer": 1, "site": "resid_post", "sae": "train"}],
    "saes": {"train": {"expansion_factor": 2, "k": 6, "training_tokens": 4096, "batch_size": 128,
                       "corpus_sequences": 200, "lr": 0.003}},
    "reconstruction": {"threshold": 0.12, "bootstrap_samples": 200, "bootstrap_seed": 7},
}


@pytest.fixture(scope="module")
def project(tiny_toy_root, tmp_path_factory):
    """The tiny toy model (conftest) after `collect` and `saes` on RAW: real eval-split activations, real
    sae-lens SAEs trained on the toy corpus, so the spliced-in figures come from real forward passes."""
    import shutil

    from sasgate.determinism import make_deterministic
    from sasgate.evalset import relock
    from sasgate.stages import collect, saes

    root = tmp_path_factory.mktemp("recon")
    shutil.copytree(tiny_toy_root / "artifacts", root / "artifacts")
    (root / "data").mkdir()
    params = parse_params(copy.deepcopy(RAW))
    paths = Paths.at(root)
    relock(params, paths, "test")
    make_deterministic(params.runtime.seed, params.runtime.threads)
    collect.run(params, paths)
    saes.run(params, paths)
    return paths


def run_gate(paths: Paths, **recon) -> dict:
    from sasgate.stages import reconstruction

    raw = copy.deepcopy(RAW)
    raw["reconstruction"].update(recon)
    reconstruction.run(parse_params(raw), paths)
    return json.loads(paths.gate("reconstruction").read_text())


def outputs(paths: Paths) -> dict[str, bytes]:
    files = [paths.gate("reconstruction"), paths.metrics("reconstruction"), paths.plot("reconstruction"),
             paths.manifest("reconstruction")]
    return {paths.rel(f): f.read_bytes() for f in files}


def _non_bos(paths: Paths, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sasgate.activations import load_acts, load_token_index

    idx = load_token_index(paths, "eval")
    keep = ~idx["is_bos"]
    return load_acts(paths, "eval", key)[keep], idx["prompt_index"][keep]


def test_nmse_is_one_minus_sae_lens_explained_variance(project):
    """Cross-check against sae-lens's own metric (sae_lens.evals.ExplainedVarianceCalculator)."""
    from sae_lens.evals import ExplainedVarianceCalculator

    gate = run_gate(project)
    for row in gate["per_tuple"]:
        key = row["extra"]["key"]
        x, _ = _non_bos(project, key)
        sae = sae_io.load_sae_dir(project.sae_dir(key))
        calc = ExplainedVarianceCalculator()
        with torch.no_grad():
            for chunk in x.split(97):  # several batches, as sae-lens's eval loop feeds it
                calc.add_batch(sae_output=sae.decode(sae.encode(chunk)), hidden_acts=chunk)
        ev = calc.compute()
        assert 0.0 < row["observed"] < 1.0  # a real but imperfect SAE: the comparison is not trivial
        assert row["observed"] == pytest.approx(1.0 - ev, abs=1e-4)


def test_bos_is_excluded_and_token_set_declared(project):
    from sasgate.activations import load_token_index

    gate = run_gate(project)
    idx = load_token_index(project, "eval")
    n_non_bos = int((~idx["is_bos"]).sum())
    n_prompts = int(torch.unique(idx["prompt_index"]).numel())
    assert int(idx["is_bos"].sum()) == n_prompts > 0  # one BOS per prompt, left out
    assert gate["details"]["token_set"] == {"split": "eval", "description": "eval split, all prompt tokens except BOS",
                                            "n_tokens": n_non_bos, "n_prompts": n_prompts}
    assert "resid_pre" in gate["details"]["hook_convention"]
    for row in gate["per_tuple"]:
        x, prompts = _non_bos(project, row["extra"]["key"])
        sae = sae_io.load_sae_dir(project.sae_dir(row["extra"]["key"]))
        with torch.no_grad():
            x_hat = sae.decode(sae.encode(x)).double()
        xd = x.double()
        direct = float(((xd - x_hat) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
        assert row["observed"] == pytest.approx(direct, rel=1e-9)
        assert row["extra"]["n_tokens"] == n_non_bos
        assert 0.5 < row["extra"]["cosine"] <= 1.0 and row["extra"]["l0"] <= 6 and row["extra"]["l2_ratio"] > 0


def test_gate_passes_and_fails_by_threshold_alone(project):
    """Same activations, same SAEs: only reconstruction.threshold changes between the runs."""
    low = run_gate(project, threshold=0.0)
    observed = [r["observed"] for r in low["per_tuple"]]
    assert low["status"] == "fail" and [r["status"] for r in low["per_tuple"]] == ["fail", "fail"]
    assert low["reason"].startswith("nMSE above threshold 0.0 on 2/2 required tuples")

    high = run_gate(project, threshold=max(observed) * 1.001)
    assert [r["observed"] for r in high["per_tuple"]] == observed
    assert high["status"] == "pass" and all(r["status"] == "pass" for r in high["per_tuple"])
    assert high["reason"].startswith("nMSE at or below threshold")

    between = (min(observed) + max(observed)) / 2
    mixed = run_gate(project, threshold=between)
    assert mixed["status"] == "fail" and "1/2 required tuples" in mixed["reason"]
    assert sorted(r["status"] for r in mixed["per_tuple"]) == ["fail", "pass"]

    rec = read_gate(project.gate("reconstruction"), gate="reconstruction")  # validates the written record
    assert rec.threshold == between and rec.comparison == "<="
    assert json.loads(project.metrics("reconstruction").read_text())["n_pass"] == 1
    rows = json.loads(project.plot("reconstruction").read_text())
    assert [r["required_tuple"] for r in rows] == ["L0.resid_pre", "L1.resid_post"] and rows[0]["threshold"] == between
    assert all(r["lo"] <= r["nmse"] <= r["hi"] for r in rows)


def test_gate_records_inputs_params_and_is_byte_identical(project):
    gate = run_gate(project)
    first = outputs(project)
    assert run_gate(project) == gate and outputs(project) == first
    assert set(gate["inputs"]) == {
        "artifacts/collect/eval/tokens.safetensors", "artifacts/collect/items.jsonl",
        "artifacts/model/config.json", "artifacts/model/model.safetensors", "artifacts/model/tokenizer.json",
        "artifacts/collect/eval/L0.resid_pre.safetensors", "artifacts/collect/eval/L1.resid_post.safetensors",
        "artifacts/saes/L0.resid_pre/cfg.json", "artifacts/saes/L0.resid_pre/sae_weights.safetensors",
        "artifacts/saes/L1.resid_post/cfg.json", "artifacts/saes/L1.resid_post/sae_weights.safetensors"}
    assert gate["params"]["reconstruction"]["threshold"] == 0.12 and len(gate["params"]["tuples"]) == 2
    assert gate["per_tuple"][1]["tuple"] == {"model": "toy-refusal", "layer": 1, "site": "resid_post"}
    manifest = json.loads(project.manifest("reconstruction").read_text())
    assert set(manifest["files"]) == set(first) - {"manifests/reconstruction.json"}
    for content in first.values():
        assert str(project.root).encode() not in content  # no absolute paths


def test_bootstrap_ci_contains_estimate_and_is_seeded(project):
    x, prompts = _non_bos(project, "L0.resid_pre")
    sae = sae_io.load_sae_dir(project.sae_dir("L0.resid_pre"))
    a = evaluate(sae, x, prompts, bootstrap_samples=300, bootstrap_seed=3, ci_level=0.95)
    b = evaluate(sae, x, prompts, bootstrap_samples=300, bootstrap_seed=3, ci_level=0.95)
    c = evaluate(sae, x, prompts, bootstrap_samples=300, bootstrap_seed=4, ci_level=0.95)
    assert a.ci == b.ci and a.ci != c.ci
    assert a.ci[0] < a.nmse < a.ci[1]
    narrow = evaluate(sae, x, prompts, bootstrap_samples=300, bootstrap_seed=3, ci_level=0.5)
    assert a.ci[0] < narrow.ci[0] < narrow.ci[1] < a.ci[1]
    gate = run_gate(project, bootstrap_seed=11)
    assert gate["per_tuple"][0]["ci95"][0] <= gate["per_tuple"][0]["observed"] <= gate["per_tuple"][0]["ci95"][1]


def test_bootstrap_resamples_prompts_not_tokens():
    """Ten identical prompts: every prompt-level draw has the same nMSE, so the CI has zero width.
    (Resampling tokens instead would give a spread.)"""
    g = torch.Generator().manual_seed(0)
    one = torch.randn(6, 4, generator=g)
    x = one.repeat(10, 1)
    x_hat = (one + 0.3 * torch.randn(6, 4, generator=g)).repeat(10, 1)
    prompts = torch.arange(10).repeat_interleave(6)
    st = prompt_stats(x, x_hat, prompts)
    lo, hi = bootstrap_nmse(st, samples=200, seed=0, level=0.95)
    assert lo == pytest.approx(hi, abs=1e-12) == pytest.approx(nmse_from_stats(st), abs=1e-12)
    shuffled = prompt_stats(x, x_hat, torch.arange(60) % 10)  # grouping changes, the point estimate does not
    assert nmse_from_stats(shuffled) == pytest.approx(nmse_from_stats(st), rel=1e-12)
    lo2, hi2 = bootstrap_nmse(shuffled, samples=200, seed=0, level=0.95)
    assert hi2 - lo2 > 1e-3


def test_nmse_hand_computed():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [1.0, -3.0]])
    x_hat = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0], [1.0, -2.0]])
    # residual: 1 + 1 + 1 + 1 = 4; mean (1, 0): variance sum 1 + 1 + 9 + 9 = 20
    st = prompt_stats(x, x_hat, torch.tensor([0, 0, 1, 1]))
    assert nmse_from_stats(st) == pytest.approx(0.2, rel=1e-12)
    assert np.array_equal(st.n, [2.0, 2.0])


def test_stale_or_mismatched_inputs_are_refused(project, tmp_path):
    from sasgate.stages import reconstruction

    raw = copy.deepcopy(RAW)
    raw["tuples"][0]["sae"] = "path:elsewhere"
    with pytest.raises(ArtifactError, match="rerun the `saes` stage"):
        reconstruction.run(parse_params(raw), project)
    empty = Paths.at(tmp_path)
    with pytest.raises(ArtifactError, match="missing activation file"):
        reconstruction.run(parse_params(copy.deepcopy(RAW)), empty)


# --------------------------------------------------------------------------- spliced-in figures and criteria (issue 15)

REQUIRED_METRICS = {"nmse", "nmse_steered_positions", "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation",
                    "ce_loss_score", "kl_div_score", "kl_per_token", "top1_agreement", "l0", "dead_latents",
                    "alive_latents", "eps_random_kl_ratio", "delta_ce"}


def test_every_row_records_the_spliced_in_metrics(project):
    gate = run_gate(project)
    for row in gate["per_tuple"]:
        m, ex = row["metrics"], row["extra"]
        assert REQUIRED_METRICS <= set(m) and all(isinstance(v, float) for v in m.values())
        assert m["nmse"] == row["observed"] and m["explained_variance"] == pytest.approx(1 - m["nmse"])
        # the formulas as written in the record (sae-lens's scores)
        assert m["ce_loss_score"] == pytest.approx((m["ce_zero_ablation"] - m["ce_spliced"])
                                                   / (m["ce_zero_ablation"] - m["ce_clean"]), rel=1e-12)
        assert m["kl_div_score"] == pytest.approx((m["kl_zero_ablation"] - m["kl_per_token"]) / m["kl_zero_ablation"],
                                                  rel=1e-12)
        assert m["delta_ce"] == pytest.approx(m["ce_spliced"] - m["ce_clean"], rel=1e-12)
        assert m["eps_random_kl_ratio"] == pytest.approx(m["kl_per_token"] / m["kl_eps_random"], rel=1e-12)
        # a real, imperfect SAE: splicing costs less than zero ablation, but something
        assert m["ce_zero_ablation"] > m["ce_spliced"] and m["kl_zero_ablation"] > m["kl_per_token"] > 0
        assert 0 < m["top1_agreement"] <= 1 and m["kl_eps_random"] > 0
        assert m["dead_latents"] + m["alive_latents"] == ex["sae"]["d_sae"] and m["alive_latents"] > 0
        assert m["nmse_steered_positions"] > 0 and m["nmse_steered_positions"] != m["nmse"]
        for name in ("nmse", "delta_ce", "kl_per_token"):
            lo, hi = ex["ci"][name]
            assert lo <= m[name] <= hi and lo < hi
        assert row["criteria"] == [{"metric": "nmse", "comparison": "<=", "threshold": 0.12, "observed": m["nmse"],
                                    "pass": m["nmse"] <= 0.12}]
    assert gate["details"]["criteria"] == [{"metric": "nmse", "comparison": "<=", "threshold": 0.12}]


def test_nmse_at_steered_positions_is_the_same_formula_on_post_instruction_tokens(project):
    from sasgate.activations import load_acts, load_token_index

    gate = run_gate(project)
    idx = load_token_index(project, "eval")
    steered = (idx["post_instruction"] != 0) & ~idx["is_bos"]
    for row in gate["per_tuple"]:
        key = row["extra"]["key"]
        x = load_acts(project, "eval", key)[steered].double()
        sae = sae_io.load_sae_dir(project.sae_dir(key))
        with torch.no_grad():
            x_hat = sae.decode(sae.encode(x.float())).double()
        direct = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        assert row["metrics"]["nmse_steered_positions"] == pytest.approx(direct, rel=1e-6)
    assert gate["details"]["steered_positions"]["n_tokens"] == int(steered.sum())


def test_extra_criteria_fail_a_tuple_that_passes_on_nmse_and_say_which(project):
    """Same SAEs, nMSE passes everywhere (threshold 10): only the extra criterion decides."""
    base = run_gate(project, threshold=10.0)
    assert base["status"] == "pass"
    kl = [r["metrics"]["kl_div_score"] for r in base["per_tuple"]]
    cut = (min(kl) + max(kl)) / 2
    gate = run_gate(project, threshold=10.0, criteria=[{"metric": "kl_div_score", "comparison": ">=", "threshold": cut}])
    assert gate["status"] == "fail"
    by_key = {r["extra"]["key"]: r for r in gate["per_tuple"]}
    worst = min(by_key, key=lambda k: by_key[k]["metrics"]["kl_div_score"])
    row = by_key[worst]
    assert row["status"] == "fail" and row["criteria"][0]["pass"] is True
    assert row["criteria"][1] == {"metric": "kl_div_score", "comparison": ">=", "threshold": cut,
                                  "observed": row["metrics"]["kl_div_score"], "pass": False}
    assert row["extra"]["failed_criteria"] == ["kl_div_score"]
    assert sorted(r["status"] for r in gate["per_tuple"]) == ["fail", "pass"]
    assert gate["reason"].startswith("nMSE at or below threshold 10.0 on 2/2 required tuples, but other criteria "
                                     "fail on 1/2")
    assert f"{worst}: kl_div_score" in gate["reason"]
    # and the other way round: a criterion every tuple meets changes nothing
    easy = run_gate(project, threshold=10.0, criteria=[{"metric": "kl_div_score", "comparison": ">=", "threshold": -1.0}])
    assert easy["status"] == "pass" and all(len(r["criteria"]) == 2 for r in easy["per_tuple"])
    from sasgate.consistency import check_reconstruction
    from sasgate.gates import TupleRef, validate_gate

    required = [TupleRef(**r["tuple"]) for r in gate["per_tuple"]]
    for g in (base, gate, easy):
        check_reconstruction(validate_gate(g), required)  # what the stage writes is consistent with itself


def test_eps_random_baseline_is_seeded(project):
    a = run_gate(project)
    b = run_gate(project, bootstrap_seed=8)
    for ra, rb in zip(a["per_tuple"], b["per_tuple"]):
        assert ra["metrics"]["kl_per_token"] == rb["metrics"]["kl_per_token"]  # no randomness in splicing
        assert ra["metrics"]["kl_eps_random"] != rb["metrics"]["kl_eps_random"]  # another draw
    assert run_gate(project) == a


def _equal_length_batch(project, n_rows: int = 6):
    """Eval prompts cut to one length (no padding), so sae-lens's unmasked forward sees what ours does."""
    from sasgate.activations import split_items
    from sasgate.modeling import toy_model_from_dir

    chat = toy_model_from_dir(project.model_dir)
    rows = [chat.prompt_ids(it.text) for it in split_items(project, "eval")[:n_rows]]
    width = min(len(r) for r in rows)
    return chat, torch.tensor([r[:width] for r in rows], dtype=torch.long)


@pytest.mark.parametrize("skip_bos", [False, True])
def test_spliced_in_ce_and_kl_agree_with_sae_lens(project, skip_bos):
    """Cross-check against sae-lens's own implementation (sae_lens.evals.get_recons_loss, what run_evals uses for
    ce_loss_score and kl_div_score) on the same tokens, to 1e-5 (both in float32; the sums differ in order only).
    All positions substituted (sae-lens's default), and with BOS left alone (the gate's token set: sae-lens's
    ignore_tokens masks the replacement; its zero ablation ignores the mask, so only the spliced figures compare)."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    from sasgate.spliced import Batch, spliced_metrics

    chat, tokens = _equal_length_batch(project)
    sub = torch.ones_like(tokens, dtype=torch.bool)
    if skip_bos:
        sub &= tokens != chat.bos_id
        assert not sub[:, 0].any() and sub[:, 1:].all()
    for key in ("L0.resid_pre", "L1.resid_post"):
        sae = sae_io.load_sae_dir(project.sae_dir(key))
        hook = sae.cfg.metadata.hook_name
        with torch.no_grad():
            ref = get_recons_loss(sae, chat.model, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True,
                                  ignore_tokens=[chat.bos_id] if skip_bos else None)
        ce_mask = sub[:, :-1]
        ref_mean = {k: float(v[sub if v.shape == sub.shape else ce_mask].double().mean()) for k, v in ref.items()}
        batch = Batch(ids=tokens, mask=torch.ones_like(tokens, dtype=torch.bool), substitute=sub,
                      prompt=torch.arange(tokens.shape[0]))
        ours = spliced_metrics(chat.model, sae, hook, [batch], mean_act=torch.zeros(D), seed=0, bootstrap_samples=20,
                               bootstrap_seed=0, ci_level=0.9)
        assert ours.n_kl_tokens == int(sub.sum()) and ours.n_ce_tokens == int(ce_mask.sum())
        tol = dict(rel=1e-5, abs=1e-6)
        assert ours.ce["clean"] == pytest.approx(ref_mean["ce_loss_without_sae"], **tol)
        assert ours.ce["spliced"] == pytest.approx(ref_mean["ce_loss_with_sae"], **tol)
        assert ours.kl["spliced"] == pytest.approx(ref_mean["kl_div_with_sae"], **tol)
        assert ours.kl["spliced"] > 1e-4 and ours.ce["spliced"] != ours.ce["clean"]  # a comparison that can fail
        if not skip_bos:
            assert ours.ce["zero_ablation"] == pytest.approx(ref_mean["ce_loss_with_ablation"], **tol)
            assert ours.kl["zero_ablation"] == pytest.approx(ref_mean["kl_div_with_ablation"], **tol)
            # sae-lens's scores (get_downstream_reconstruction_metrics) from the same means
            ce_score = ((ref_mean["ce_loss_with_ablation"] - ref_mean["ce_loss_with_sae"])
                        / (ref_mean["ce_loss_with_ablation"] - ref_mean["ce_loss_without_sae"]))
            kl_score = ((ref_mean["kl_div_with_ablation"] - ref_mean["kl_div_with_sae"])
                        / ref_mean["kl_div_with_ablation"])
            assert ours.ce_loss_score == pytest.approx(ce_score, rel=1e-4)
            assert ours.kl_div_score == pytest.approx(kl_score, rel=1e-4)


def test_registry_expected_figures_are_compared_and_a_large_disagreement_is_flagged():
    """The installed sae-lens registry states variance_explained / l0 for some SAEs (issue 15, point 4)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    stated = [(lk, sid) for lk in directory.values() for sid in lk.saes_map
              if lk.expected_l0.get(sid, 0.0) not in (0.0, None)]
    assert stated  # the registry does state some
    lookup, sid = stated[0]
    exp = sae_io.registry_expected(lookup, sid)
    assert exp["l0"] == float(lookup.expected_l0[sid])
    near = sae_io.compare_expected(exp, exp["var_explained"] or 0.7, exp["l0"] * 1.5)
    assert near["large_disagreement"] is False and near["problems"] == []
    far = sae_io.compare_expected(exp, (exp["var_explained"] or 0.7) - 0.3, exp["l0"] * 3)
    assert far["large_disagreement"] is True and any("L0" in p for p in far["problems"])
    if exp["var_explained"] is not None:
        assert any("explained variance" in p for p in far["problems"])
    assert sae_io.compare_expected({"var_explained": None, "l0": None}, 0.5, 3.0) is None
    assert sae_io.compare_expected(None, 0.5, 3.0) is None  # trained or local SAEs state nothing


def test_trained_saes_state_no_registry_figures(project):
    gate = run_gate(project)
    assert all(r["extra"]["registry_expected"] is None for r in gate["per_tuple"])
    assert "registry figures" not in gate["reason"]


def test_a_missing_or_non_finite_metric_stops_the_stage_never_passes():
    from sasgate.params import RECONSTRUCTION_METRICS
    from sasgate.stages.reconstruction import _finite

    good = {m: 0.5 for m in RECONSTRUCTION_METRICS}
    assert _finite("L0.resid_pre", good) == good
    for bad in ({**good, "kl_div_score": float("nan")}, {**good, "nmse_steered_positions": float("inf")},
                {k: v for k, v in good.items() if k != "ce_loss_score"}):
        with pytest.raises(ArtifactError, match="L0.resid_pre"):
            _finite("L0.resid_pre", bad)
