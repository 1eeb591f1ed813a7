"""`reconstruction`: the "unlock" gate. nMSE of each required tuple's SAE on the eval split.

Per required tuple: the eval-split activations (every stored prompt token except BOS; pads
are never stored), full SAE reconstruction (encode -> decode), nMSE in float64 with a
prompt-level bootstrap CI, plus cosine, L2 ratio and L0 (sasgate.nmse). A tuple passes when
nMSE <= reconstruction.threshold; the gate passes iff every required tuple passes.

Outputs (byte-identical across runs, no timestamps or absolute paths): gates/reconstruction.json
(the gate record), metrics/reconstruction.json, plots/reconstruction.json (rows for a DVC bar
plot), manifests/reconstruction.json.
"""

from __future__ import annotations

from typing import Any

import torch

from sasgate import sae_io
from sasgate.activations import activation_file, load_acts, load_token_index, token_index_file
from sasgate.artifacts import atomic_write_json, write_manifest
from sasgate.errors import ArtifactError
from sasgate.gates import GATE_SCHEMA, compare, input_digests, write_gate
from sasgate.nmse import evaluate
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

GATE = "reconstruction"
METRIC = "nmse"
SPLIT = "eval"
METRICS_SCHEMA = "sasgate.metrics.reconstruction/1"
TOKEN_SET = "eval split, all prompt tokens except BOS"
HOOK_CONVENTION = ("transformer-lens hook names: blocks.{l}.hook_resid_pre is the input to block l "
                   "(= blocks.{l-1}.hook_resid_post); blocks.{l}.hook_resid_post is the output of block l")
NMSE_DEFINITION = ("sum_t ||x_t - x̂_t||^2 / sum_t ||x_t - mean_t x||^2 over the token set, float64 "
                   "(fraction of variance unexplained = 1 - sae-lens explained_variance)")


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _reason(statuses: dict[str, str], nmse: dict[str, float], threshold: float) -> str:
    n = len(statuses)
    failed = [k for k, s in statuses.items() if s == "fail"]
    if failed:
        worst = ", ".join(f"{k} {_fmt(nmse[k])}" for k in failed)
        return f"nMSE above threshold {threshold} on {len(failed)}/{n} required tuples ({worst})"
    return f"nMSE at or below threshold {threshold} on {n}/{n} required tuples"


def run(params: Params, paths: Paths) -> dict[str, Any]:
    rp = params.reconstruction
    device = params.runtime.device
    index = load_token_index(paths, SPLIT)
    keep = ~index["is_bos"]
    prompt_index = index["prompt_index"][keep]
    n_prompts = int(torch.unique(prompt_index).numel())
    n_tokens = int(keep.sum())
    if n_tokens == 0:
        raise ArtifactError(f"{paths.rel(token_index_file(paths, SPLIT))}: the eval split has no non-BOS tokens")

    per_tuple: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    plot_rows: list[dict[str, Any]] = []
    statuses: dict[str, str] = {}
    observed: dict[str, float] = {}
    inputs = [token_index_file(paths, SPLIT)]
    for tp in params.tuples:
        acts = load_acts(paths, SPLIT, tp.key)
        if acts.shape[0] != keep.shape[0]:
            raise ArtifactError(
                f"{paths.rel(activation_file(paths, SPLIT, tp.key))} has {acts.shape[0]} rows but the token index "
                f"has {keep.shape[0]}; rerun `collect`"
            )
        sae, src = sae_io.load_tuple_sae(paths, tp, device=device)
        if int(sae.cfg.d_in) != acts.shape[1]:
            raise ArtifactError(
                f"SAE for {tp.key} has d_in = {sae.cfg.d_in} but the {SPLIT} activations are {acts.shape[1]} wide"
            )
        res = evaluate(sae, acts[keep], prompt_index, rp.bootstrap_samples, rp.bootstrap_seed, rp.ci_level)
        status = "pass" if compare(res.nmse, rp.comparison, rp.threshold) else "fail"
        statuses[tp.key], observed[tp.key] = status, res.nmse
        per_tuple.append({
            "tuple": {"model": params.model.name, "layer": tp.layer, "site": tp.site},
            "observed": res.nmse,
            "ci95": list(res.ci),
            "status": status,
            "extra": {"key": tp.key, "hook_name": tp.hook_name, "ci_level": rp.ci_level,
                      "cosine": res.cosine, "l2_ratio": res.l2_ratio, "l0": res.l0,
                      "explained_variance": 1.0 - res.nmse, "n_tokens": res.n_tokens, "n_prompts": res.n_prompts,
                      "sae": {"spec": tp.sae, "architecture": src["sae"]["architecture"],
                              "d_sae": src["sae"]["d_sae"], "hook_match": src["checks"]["hook_match"],
                              "model_match": src["checks"]["model_match"]}},
        })
        metrics[tp.key] = {"nmse": res.nmse, "ci": list(res.ci), "cosine": res.cosine, "l2_ratio": res.l2_ratio,
                           "l0": res.l0, "status": status}
        plot_rows.append({"required_tuple": tp.key, "nmse": res.nmse, "threshold": rp.threshold})
        inputs += [activation_file(paths, SPLIT, tp.key), *sae_io.sae_files(paths, tp.key)]

    gate_status = "pass" if all(s == "pass" for s in statuses.values()) else "fail"
    record = {
        "schema": GATE_SCHEMA,
        "gate": GATE,
        "status": gate_status,
        "metric": METRIC,
        "threshold": rp.threshold,
        "comparison": rp.comparison,
        "per_tuple": per_tuple,
        "inputs": input_digests(paths.root, inputs),
        "params": params.section("reconstruction", "tuples") | {"model": params.model.name},
        "reason": _reason(statuses, observed, rp.threshold),
        "details": {
            "token_set": {"split": SPLIT, "description": TOKEN_SET, "n_tokens": n_tokens, "n_prompts": n_prompts},
            "hook_convention": HOOK_CONVENTION,
            "nmse_definition": NMSE_DEFINITION,
            "bootstrap": {"unit": "prompt", "samples": rp.bootstrap_samples, "seed": rp.bootstrap_seed,
                          "ci_level": rp.ci_level, "method": "percentile", "rng": "numpy.random.default_rng"},
            "reconstruction": "full: decode(encode(x)), no error term",
        },
    }
    write_gate(paths.gate(GATE), record)
    summary = {"schema": METRICS_SCHEMA, "status": gate_status, "threshold": rp.threshold,
               "comparison": rp.comparison, "n_pass": sum(s == "pass" for s in statuses.values()),
               "n_tuples": len(statuses), "tuples": metrics}
    atomic_write_json(paths.metrics(GATE), summary)
    atomic_write_json(paths.plot(GATE), plot_rows)
    write_manifest(paths.manifest(GATE), GATE, [paths.gate(GATE), paths.metrics(GATE), paths.plot(GATE)], paths.root)
    return record


if __name__ == "__main__":
    stage_main(GATE, run)
