"""`directions`: the DIM refusal direction, chosen by Arditi et al.'s rule on the selection split only.

Candidates are the difference in means (harmful - harmless) of resid_pre at every layer and
post-instruction position, from the selection activations `collect` stored. Each is scored on
selection prompts (KL of harmless next-token distributions under ablation, refusal score under
addition on harmless prompts, refusal score under ablation on harmful prompts) and filtered by
the rule in sasgate.dim. The eval split is never read here; the items are checked for
selection/eval leakage first (LeakageError, exit 4).

Outputs: artifacts/directions/ (directions.safetensors: every candidate and the chosen
direction; selection.json: every candidate with its scores and why it was kept or discarded),
metrics/directions.json, manifests/directions.json.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sasgate import dim
from sasgate.activations import load_post_instruction, post_instruction_file, split_items
from sasgate.artifacts import atomic_dir, atomic_write_json, write_manifest
from sasgate.errors import ArtifactError
from sasgate.evalset import EvalItem
from sasgate.modeling import load_chat_model
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

SCHEMA = "sasgate.directions/1"
RULE = ("Arditi et al. 2024 (appendix C): discard candidates in the last prune_layer_fraction of layers, "
        "whose directional ablation moves harmless next-token distributions by KL > kl_threshold, or whose "
        "activation addition gives an induce score < induce_threshold; of the rest take the lowest refusal "
        "score under ablation on harmful prompts")


def scoring_prompts(items: list[EvalItem], label: str, n: int) -> list[EvalItem]:
    """Up to n selection prompts of one class, original wordings first (distinct sources before paraphrases)."""
    return sorted((it for it in items if it.label == label), key=lambda it: (it.paraphrase_set, it.id))[:n]


def run(params: Params, paths: Paths) -> dict[str, Any]:
    dp = params.directions
    items = split_items(paths, "selection")
    acts = load_post_instruction(paths, "selection")
    if acts.shape[0] != len(items):
        raise ArtifactError(f"{paths.rel(post_instruction_file(paths, 'selection'))} has {acts.shape[0]} rows "
                            f"for {len(items)} selection items; rerun `dvc repro collect`")
    harmful = torch.tensor([it.label == "harmful" for it in items])
    candidates = dim.mean_difference(acts, harmful)  # [layers, positions, d_model]
    n_layers, n_pos = candidates.shape[:2]
    positions = list(range(-n_pos, 0))

    chat = load_chat_model(params, paths)
    refusal_ids = dim.refusal_token_ids(chat.codec.encode, dp.refusal_tokens)
    prompts = {lab: scoring_prompts(items, lab, dp.max_prompts) for lab in ("harmful", "harmless")}
    bar = lambda cells: tqdm(cells, desc="directions: scoring candidates", unit="candidate", leave=False)  # noqa: E731
    scored, baseline = dim.score_candidates(
        chat, candidates, positions, [it.text for it in prompts["harmful"]], [it.text for it in prompts["harmless"]],
        refusal_ids, batch_size=dp.batch_size, progress=bar)
    annotated, chosen = dim.select(scored, n_layers, dp)
    best = annotated[chosen]
    direction = candidates[best["layer"], positions.index(best["position"])].clone()  # its own storage, for safetensors

    record = {
        "schema": SCHEMA,
        "rule": RULE,
        "params": params.section("directions")["directions"],
        "n_layers": n_layers,
        "prune_from_layer": int(n_layers * (1.0 - dp.prune_layer_fraction)),
        "site": "resid_pre",
        "positions": positions,
        "refusal_token_ids": refusal_ids,
        "scoring_prompts": {lab: [it.id for it in v] for lab, v in prompts.items()},
        "n_selection_items": {lab: int((harmful == (lab == "harmful")).sum()) for lab in ("harmful", "harmless")},
        "baseline": baseline,
        "candidates": annotated,
        "chosen": {"layer": best["layer"], "position": best["position"], "hook": f"blocks.{best['layer']}.hook_resid_pre",
                   "norm": best["norm"], "kl": best["kl"], "induce_score": best["induce_score"],
                   "ablation_score": best["ablation_score"]},
    }
    with atomic_dir(paths.directions_dir) as tmp:
        save_file({"candidates": candidates.contiguous(), "direction": direction}, str(tmp / dim.VECTORS_FILE))
        atomic_write_json(tmp / dim.RECORD_FILE, record)
    metrics = {"chosen": record["chosen"], "n_candidates": len(annotated),
               "n_kept": sum(c["kept"] for c in annotated), "baseline": baseline}
    atomic_write_json(paths.metrics("directions"), metrics)
    write_manifest(paths.manifest("directions"), "directions", [paths.directions_dir, paths.metrics("directions")],
                   paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("directions", run)
