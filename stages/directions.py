"""`directions`: the DIM refusal direction, chosen by Arditi et al.'s rule on the selection split only.

As in their `refusal_direction` code: every selection prompt's unsteered refusal score is computed and
prompts whose score contradicts their label are dropped (`directions.filter_by_baseline`); the selection
sources of each class are split (seeded, by source, so paraphrases stay together) into a build part
(`directions.build_fraction`) and a validation part. Candidates are the difference in means (harmful -
harmless) of resid_pre at every layer and post-instruction position over the build part; each is scored
on the validation part (KL of harmless next-token distributions under ablation, refusal score under
addition on harmless prompts, under ablation on harmful prompts) and filtered by the rule in sasgate.dim.

When the filter would empty a part, or no candidate survives the rule, the record says so
(`rule_satisfied: false`, `problems`) and keeps the nearest candidate: the behaviour gate then fails
closed, naming why, and the pipeline still reaches a decision (a model that does not refuse ends in
`behaviour_invalid`, not in a crash). The eval split is never read here; the items are checked for
selection/eval leakage first (LeakageError, exit 4).

Outputs: artifacts/directions/ (directions.safetensors: every candidate and the chosen direction;
selection.json: the parts, the filter, every candidate with its scores and why it was kept or
discarded), metrics/directions.json, manifests/directions.json.
"""

from __future__ import annotations

import random
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

SCHEMA = "sasgate.directions/2"
LABELS = ("harmful", "harmless")
RULE = ("Arditi et al. 2024 (appendix C): discard candidates in the last prune_layer_fraction of layers, "
        "whose directional ablation moves harmless next-token distributions by KL > kl_threshold, or whose "
        "activation addition gives an induce score < induce_threshold; of the rest take the lowest refusal "
        "score under ablation on harmful prompts")


def split_parts(items: list[EvalItem], build_fraction: float, seed: int) -> dict[str, set[str]]:
    """{"build": source ids, "validation": source ids}: each class's selection sources shuffled (seeded) and
    cut at build_fraction, at least one source on each side."""
    parts: dict[str, set[str]] = {"build": set(), "validation": set()}
    for label in LABELS:
        sources = sorted({it.source_id for it in items if it.label == label})
        if len(sources) < 2:
            raise ArtifactError(f"the selection split has {len(sources)} {label} source(s); the build/validation "
                                "split needs at least 2 (raise eval.n_selection)")
        random.Random(f"{seed}:dim-parts:{label}").shuffle(sources)
        cut = min(max(1, round(build_fraction * len(sources))), len(sources) - 1)
        parts["build"].update(sources[:cut])
        parts["validation"].update(sources[cut:])
    return parts


def run(params: Params, paths: Paths) -> dict[str, Any]:
    dp = params.directions
    items = split_items(paths, "selection")
    acts = load_post_instruction(paths, "selection")
    if acts.shape[0] != len(items):
        raise ArtifactError(f"{paths.rel(post_instruction_file(paths, 'selection'))} has {acts.shape[0]} rows "
                            f"for {len(items)} selection items; rerun `dvc repro collect`")
    chat = load_chat_model(params, paths)
    refusal_ids = dim.refusal_token_ids(chat.codec.encode, dp.refusal_tokens)
    baseline_scores = dim.refusal_score(dim.last_logits(chat, [it.text for it in items], (), dp.batch_size),
                                        refusal_ids).tolist()
    parts = split_parts(items, dp.build_fraction, dp.split_seed)

    problems: list[str] = []
    dropped = [dp.filter_by_baseline and dim.contradicts_label(s, it.label == "harmful")
               for it, s in zip(items, baseline_scores)]
    rows: dict[str, list[int]] = {}
    for part, sources in parts.items():
        rows[part] = [i for i, it in enumerate(items) if it.source_id in sources and not dropped[i]]
        for label in LABELS:
            if not any(items[i].label == label for i in rows[part]):
                problems.append(f"the baseline filter leaves no {label} prompt in the {part} part (the unsteered "
                                f"model's refusal score contradicts the label on every one)")
    if problems:  # keep the rule's data usable and say so: the record is flagged, the gate fails
        rows = {part: [i for i, it in enumerate(items) if it.source_id in sources] for part, sources in parts.items()}

    build = rows["build"]
    harmful = torch.tensor([items[i].label == "harmful" for i in build])
    candidates = dim.mean_difference(acts[build], harmful)  # [layers, positions, d_model]
    n_layers, n_pos = candidates.shape[:2]
    positions = list(range(-n_pos, 0))
    scoring = {lab: [items[i] for i in rows["validation"] if items[i].label == lab] for lab in LABELS}
    bar = lambda cells: tqdm(cells, desc="directions: scoring candidates", unit="candidate", leave=False)  # noqa: E731
    scored, baseline = dim.score_candidates(
        chat, candidates, positions, [it.text for it in scoring["harmful"]], [it.text for it in scoring["harmless"]],
        refusal_ids, batch_size=dp.batch_size, progress=bar, layers=dp.candidate_layers)
    annotated, chosen, satisfied = dim.select(scored, n_layers, dp)
    if not satisfied:
        problems.append("no candidate survives the rule; nearest: L{layer} pos {position}: {why}".format(
            why="; ".join(annotated[chosen]["reasons"]), **annotated[chosen]))
    best = annotated[chosen]
    direction = candidates[best["layer"], positions.index(best["position"])].clone()  # own storage, for safetensors

    record = {
        "schema": SCHEMA,
        "rule": RULE,
        "params": params.section("directions")["directions"],
        "rule_satisfied": not problems,
        "problems": problems,
        "n_layers": n_layers,
        "prune_from_layer": int(n_layers * (1.0 - dp.prune_layer_fraction)),
        "site": "resid_pre",
        "positions": positions,
        "refusal_token_ids": refusal_ids,
        "filter": {"applied": dp.filter_by_baseline and not problems, "rule": "drop harmful prompts with baseline "
                   "refusal score < 0 and harmless prompts with score > 0",
                   "dropped": {lab: sum(d for d, it in zip(dropped, items) if it.label == lab) for lab in LABELS},
                   "dropped_items": sorted(it.id for d, it in zip(dropped, items) if d)},
        "parts": {part: {"sources": sorted(parts[part]), "items": sorted(items[i].id for i in rows[part]),
                         "n_prompts": {lab: sum(items[i].label == lab for i in rows[part]) for lab in LABELS}}
                  for part in parts},
        "baseline": baseline,
        "candidates": annotated,
        "chosen": {"layer": best["layer"], "position": best["position"], "hook": f"blocks.{best['layer']}.hook_resid_pre",
                   "norm": best["norm"], "kl": best["kl"], "induce_score": best["induce_score"],
                   "ablation_score": best["ablation_score"]},
    }
    with atomic_dir(paths.directions_dir) as tmp:
        save_file({"candidates": candidates.contiguous(), "direction": direction}, str(tmp / dim.VECTORS_FILE))
        atomic_write_json(tmp / dim.RECORD_FILE, record)
    metrics = {"chosen": record["chosen"], "rule_satisfied": record["rule_satisfied"], "n_candidates": len(annotated),
               "n_kept": sum(c["kept"] for c in annotated), "baseline": baseline, "filter_dropped": record["filter"]["dropped"],
               "parts": {p: v["n_prompts"] for p, v in record["parts"].items()}}
    atomic_write_json(paths.metrics("directions"), metrics)
    write_manifest(paths.manifest("directions"), "directions", [paths.directions_dir, paths.metrics("directions")],
                   paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("directions", run)
