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
from safetensors.torch import save_file

from sasgate import sae_io
from sasgate.activations import activation_file, token_index_file, write_token_index
from sasgate.errors import ArtifactError
from sasgate.gates import read_gate
from sasgate.nmse import bootstrap_nmse, evaluate, nmse_from_stats, prompt_stats
from sasgate.params import SaeTrainParams, parse_params
from sasgate.paths import Paths

D = 32
RAW = {
    "model": {"toy": {"n_layers": 2, "d_model": D, "n_heads": 2, "d_mlp": 64, "n_ctx": 48, "n_validation": 4}},
    "eval": {"n_selection": 4, "n_eval": 8, "n_paraphrases": 1},
    "tuples": [{"layer": 0, "site": "resid_pre", "sae": "train"}, {"layer": 1, "site": "resid_post", "sae": "train"}],
    "reconstruction": {"threshold": 0.12, "bootstrap_samples": 200, "bootstrap_seed": 7},
}
N_PROMPTS = 40


def _draw(seed: int, n: int, prompt_of: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse codes over a fixed dictionary + offset + noise; with prompt ids, a per-prompt shift."""
    g = torch.Generator().manual_seed(1000)
    dictionary = torch.randn(64, D, generator=g)
    offset = 2.0 * torch.randn(D, generator=g)
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(n, 64, generator=g) < 0.06).float() * (0.5 + torch.rand(n, 64, generator=g))
    x = codes @ dictionary + offset + 0.05 * torch.randn(n, D, generator=g)
    if prompt_of is not None:
        x = x + 0.3 * torch.randn(int(prompt_of.max()) + 1, D, generator=g)[prompt_of]
    return x


def _token_index() -> dict[str, torch.Tensor]:
    lengths = [5 + (p * 7) % 6 for p in range(N_PROMPTS)]  # BOS + 4..9 prompt tokens
    prompt = torch.cat([torch.full((n,), p) for p, n in enumerate(lengths)])
    position = torch.cat([torch.arange(n) for n in lengths])
    post = torch.cat([torch.tensor([0] * (n - 2) + [-2, -1]) for n in lengths])
    return {"prompt_index": prompt.long(), "position": position.long(), "is_bos": (position == 0).to(torch.uint8),
            "post_instruction": post.long()}


def _train_sae_into(folder, params, tp, seed):
    acts = _draw(seed, 3000)
    tr = SaeTrainParams(architecture="topk", expansion_factor=2, k=6, training_tokens=40960, batch_size=256,
                        lr=3e-3, seed=0)
    res = sae_io.train_sae(acts, tr, tp.hook_name, params.model.name)
    files = sae_io.save_sae(res.sae, folder)
    sae = sae_io.load_sae_dir(folder)
    checks = sae_io.check_sae_fits(sae, tp, D, params.model.name)
    sae_io.write_source(folder, sae_io.source_record(params, tp, sae, {"source_files": {}}, files, checks, None))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project root with eval-split activations (BOS rows huge, like real models) and one SAE per tuple."""
    root = tmp_path_factory.mktemp("recon")
    paths = Paths.at(root)
    params = parse_params(copy.deepcopy(RAW))
    index = _token_index()
    (paths.collect_dir / "eval").mkdir(parents=True)
    write_token_index(token_index_file(paths, "eval"), index)
    for i, tp in enumerate(params.tuples):
        x = _draw(10 + i, index["prompt_index"].shape[0], index["prompt_index"])
        x[index["is_bos"].bool()] = 50.0 * torch.randn(int(index["is_bos"].sum()), D)  # BOS: an outlier
        save_file({"acts": x.contiguous()}, str(activation_file(paths, "eval", tp.key)))
        _train_sae_into(paths.sae_dir(tp.key), params, tp, seed=100 + i)
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
    gate = run_gate(project)
    idx = _token_index()
    n_non_bos = int((idx["is_bos"] == 0).sum())
    assert gate["details"]["token_set"] == {"split": "eval", "description": "eval split, all prompt tokens except BOS",
                                            "n_tokens": n_non_bos, "n_prompts": N_PROMPTS}
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
    assert [r["tuple"] for r in rows] == ["L0.resid_pre", "L1.resid_post"] and rows[0]["threshold"] == between


def test_gate_records_inputs_params_and_is_byte_identical(project):
    gate = run_gate(project)
    first = outputs(project)
    assert run_gate(project) == gate and outputs(project) == first
    assert set(gate["inputs"]) == {
        "artifacts/collect/eval/tokens.safetensors",
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
