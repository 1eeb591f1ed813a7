"""`steer`: generations of the whole steering grid on the eval split, after the strengths were fixed.

Every eval prompt (both classes, every paraphrase set) is generated under every setting of the grid
(sasgate.steering: the baseline and every arm at every strength, at the addition scale `calibrate`
recorded) and every seed. The gates judge only the strengths `calibrate` chose on the selection split;
the rest of the grid draws the steering curves. This stage reads `strengths.json` (so DVC runs it
after `calibrate`) and records its sha256: the eval generations provably came after the choice.

Side effects per setting, on the eval split: KL and CE change on each class's text (the prompts with the
unsteered model's own completions, sasgate.steering), and the unsteered model's perplexity of the steered
completions (a coherence figure, reported, never budgeted: a clean refusal of a harmless prompt is the
intended effect and would score as incoherent).

Outputs: artifacts/steer/ (generations.jsonl, side_effects.json), metrics/steer.json, manifests/steer.json.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm import tqdm

from sasgate import behaviour, steering
from sasgate.activations import split_items
from sasgate.artifacts import atomic_dir, atomic_write_json, sha256_file, write_manifest
from sasgate.errors import ArtifactError
from sasgate.modeling import ChatModel, load_chat_model
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main


@torch.no_grad()
def completion_nll(chat: ChatModel, instructions: list[str], completions: list[str], batch_size: int
                   ) -> tuple[float, int]:
    """(total negative log-likelihood in nats, token count) of the completions under the unsteered model."""
    total, count = 0.0, 0
    for start in range(0, len(instructions), batch_size):
        t = steering._teacher_forced(chat, instructions[start:start + batch_size], completions[start:start + batch_size])
        comp = t.scored  # the positions that predict each completion token
        if not comp.any():
            continue
        logp = torch.log_softmax(chat.model(t.ids.to(chat.device), attention_mask=t.mask.to(chat.device),
                                            return_type="logits")[:, :-1].to("cpu", torch.float64), dim=-1)
        total -= float(logp.gather(-1, t.targets[..., None])[..., 0][comp].sum())
        count += int(comp.sum())
    return total, count


def run(params: Params, paths: Paths) -> dict[str, Any]:
    items = split_items(paths, "eval")  # the leakage guard first
    strengths_file = paths.calibrate_dir / behaviour.STRENGTHS_FILE
    strengths = behaviour.read_strengths(strengths_file)
    chat = load_chat_model(params, paths)
    tp, _, _ = steering.sas_target(params, paths)
    if tp.hook_name != strengths.hook:
        raise ArtifactError(f"{paths.rel(strengths_file)} was calibrated at {strengths.hook}, but features now steer "
                            f"at {tp.hook_name}; rerun `dvc repro calibrate`")
    settings = steering.build_settings(params, chat, paths, strengths.resid_norm)

    rows: list[dict[str, Any]] = []
    perplexity: dict[tuple[str, float], tuple[float | None, int]] = {}
    for s in tqdm(settings, desc="steer: generating on eval", unit="setting", leave=False):
        produced = steering.generate(chat, params, s, items)
        rows += produced
        by_id = {it.id: it.text for it in items}
        nll, n_tok = completion_nll(chat, [by_id[r["item_id"]] for r in produced], [r["completion"] for r in produced],
                                    params.steer.batch_size)
        perplexity[(s.arm, s.strength)] = (math.exp(nll / n_tok) if n_tok else None, n_tok)

    completions = steering.baseline_completions(paths)
    texts = {lab: steering.OffTargetText(chat, [it for it in items if it.label == lab], completions,
                                         params.steer.batch_size) for lab in behaviour.LABELS}
    side = steering.side_effects(settings, texts, lambda s: perplexity[(s.arm, s.strength)])

    with atomic_dir(paths.steer_dir) as tmp:
        behaviour.write_jsonl(tmp / behaviour.GENERATIONS_FILE, rows)
        atomic_write_json(tmp / behaviour.SIDE_EFFECTS_FILE, behaviour.SideEffects(
            split="eval", measure=steering.SIDE_EFFECT_MEASURE,
            perplexity="exp(mean NLL per token) of the steered completions under the unsteered model (reported)",
            strengths_sha256=sha256_file(strengths_file), hook=strengths.hook, resid_norm=strengths.resid_norm,
            n_prompts={lab: t.n_prompts for lab, t in texts.items()},
            n_tokens={lab: t.n_tokens for lab, t in texts.items()}, settings=side).model_dump(mode="json"))
    metrics = {"n_generations": len(rows), "n_eval_items": len(items), "seeds": list(params.steer.seeds),
               "side_effects": {f"{s.arm}@{s.strength:g}": {"kl": s.kl, "perplexity": s.perplexity} for s in side}}
    atomic_write_json(paths.metrics("steer"), metrics)
    write_manifest(paths.manifest("steer"), "steer", [paths.steer_dir, paths.metrics("steer")], paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("steer", run)
