"""`steer`: generations for baseline / DIM / SAS x coefficients x seeds x paraphrase sets, eval split only.

Interventions (sasgate.interventions), each at every coefficient of its grid:

* `dim_add`: the raw DIM vector added at resid_pre of DIM's chosen layer (c = 1: Arditi's addition);
* `dim_ablate`: a fraction c of the DIM direction projected out of every residual-stream write;
* `sas_add`: the decoded top-k SAS vector added at the SAS tuple's hook;
* `sas_ablate`: the SAS latents scaled by (1 - c) at the SAS tuple's hook, SAE error term kept.

Every eval prompt (both classes, every paraphrase set) is generated under every setting and
seed: additions are judged on harmless prompts and ablations on harmful ones later, but both
classes are on record. Generation is batched and left-padded (ChatModel.generate); sampling
uses a torch.Generator seeded per (seed, batch), the same across settings, so settings are
compared on common random numbers.

Side effects per (intervention, coefficient): the mean KL(unsteered || steered) of the
last-position next-token distribution over the harmless eval prompts and over the harmful ones,
and the unsteered model's perplexity of the steered completions (a coherence proxy). The
decision budgets the KL on the class an intervention should leave alone (sasgate.behaviour).

Outputs: artifacts/steer/ (generations.jsonl, side_effects.json), metrics/steer.json,
manifests/steer.json.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm import tqdm

from sasgate import behaviour, sae_io
from sasgate.activations import split_items
from sasgate.artifacts import atomic_dir, atomic_write_json, write_manifest
from sasgate.dim import kl_divergence, last_logits, load_direction
from sasgate.errors import ArtifactError
from sasgate.evalset import EvalItem
from sasgate.interventions import Hook, addition, directional_ablation, resid_pre_hook, sae_latent_ablation
from sasgate.modeling import ChatModel, load_chat_model
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.sas import load_steering
from sasgate.stage_runner import stage_main

SEED_STRIDE = 1_000_003  # generator seed of (seed s, batch b) = s * SEED_STRIDE + b


def settings(params: Params, chat: ChatModel, paths: Paths) -> list[tuple[str, str | None, float, list[Hook]]]:
    """(intervention, tuple, coefficient, hooks) for the whole grid, baseline first."""
    sp = params.steer
    r, dim_record = load_direction(paths.directions_dir)
    layer = int(dim_record["chosen"]["layer"])
    key, v_sas, latents, _ = load_steering(paths.features_dir)
    tp = next((t for t in params.tuples if t.key == key), None)
    if tp is None:
        raise ArtifactError(f"features chose tuple {key}, which is not a required tuple in params; rerun `features`")
    sae, _ = sae_io.load_tuple_sae(paths, tp, device=params.runtime.device)
    out: list[tuple[str, str | None, float, list[Hook]]] = [("baseline", None, 0.0, [])]
    out += [("dim_add", f"L{layer}.resid_pre", c, addition(resid_pre_hook(layer), r, c)) for c in sp.add_coefficients]
    out += [("dim_ablate", "all", c, directional_ablation(chat.model, r, c)) for c in sp.ablate_coefficients]
    out += [("sas_add", key, c, addition(tp.hook_name, v_sas, c)) for c in sp.add_coefficients]
    out += [("sas_ablate", key, c, sae_latent_ablation(tp.hook_name, sae, latents, c)) for c in sp.ablate_coefficients]
    return out


@torch.no_grad()
def completion_nll(chat: ChatModel, instructions: list[str], completions: list[str], batch_size: int
                   ) -> tuple[float, int]:
    """(total negative log-likelihood in nats, token count) of the completions under the unsteered model."""
    total, count = 0.0, 0
    for start in range(0, len(instructions), batch_size):
        rows, n_comp = [], []
        for text, comp in zip(instructions[start:start + batch_size], completions[start:start + batch_size]):
            c_ids = chat.codec.encode(comp)[: max(0, chat.n_ctx - len(chat.prompt_ids(text)))]
            rows.append(chat.prompt_ids(text) + c_ids)
            n_comp.append(len(c_ids))
        if not any(n_comp):
            continue
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), chat.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (r, n) in enumerate(zip(rows, n_comp)):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
            target[i, width - n:] = True
        logp = torch.log_softmax(chat.model(ids.to(chat.device), attention_mask=mask.to(chat.device),
                                            return_type="logits").to("cpu", torch.float64), dim=-1)
        # position t predicts token t + 1
        tok_logp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        total -= float(tok_logp[target[:, 1:]].sum())
        count += int(target.sum())
    return total, count


def run(params: Params, paths: Paths) -> dict[str, Any]:
    sp = params.steer
    items = split_items(paths, "eval")
    chat = load_chat_model(params, paths)
    grid = settings(params, chat, paths)
    batches = [items[s:s + sp.batch_size] for s in range(0, len(items), sp.batch_size)]
    prompts = {lab: [it.text for it in items if it.label == lab] for lab in behaviour.LABELS}
    base_logits = {lab: last_logits(chat, texts, (), sp.batch_size) for lab, texts in prompts.items()}

    rows: list[dict[str, Any]] = []
    side: list[dict[str, Any]] = []
    bar = tqdm(total=len(grid) * len(sp.seeds) * len(batches), desc="steer: generating", unit="batch")
    with bar:
        for intervention, tuple_key, coef, hooks in grid:
            produced: list[tuple[EvalItem, str]] = []
            for seed in sp.seeds:
                for b, batch in enumerate(batches):
                    completions = chat.generate([it.text for it in batch], sp.max_new_tokens, hooks=hooks,
                                                do_sample=sp.do_sample, seed=seed * SEED_STRIDE + b,
                                                temperature=sp.temperature)
                    for it, comp in zip(batch, completions):
                        produced.append((it, comp))
                        rows.append({"item_id": it.id, "source_id": it.source_id, "label": it.label,
                                     "split": it.split, "paraphrase_set": it.paraphrase_set, "seed": seed,
                                     "intervention": intervention, "tuple": tuple_key, "coefficient": coef,
                                     "do_sample": sp.do_sample, "temperature": sp.temperature, "completion": comp})
                    bar.update()
            kl = {f"kl_{lab}": 0.0 if not hooks else float(kl_divergence(
                base_logits[lab], last_logits(chat, texts, hooks, sp.batch_size)).mean()) for lab, texts in prompts.items()}
            nll, n_tok = completion_nll(chat, [it.text for it, _ in produced], [c for _, c in produced],
                                        sp.batch_size)
            side.append({"intervention": intervention, "tuple": tuple_key, "coefficient": coef, **kl,
                         "perplexity": math.exp(nll / n_tok) if n_tok else None, "completion_tokens": n_tok,
                         "n_kl_prompts": {lab: len(texts) for lab, texts in prompts.items()}})

    with atomic_dir(paths.steer_dir) as tmp:
        behaviour.write_jsonl(tmp / behaviour.GENERATIONS_FILE, rows)
        atomic_write_json(tmp / behaviour.SIDE_EFFECTS_FILE, {
            "kl_harmless": "mean KL(unsteered || steered) of last-position next-token distributions, harmless eval prompts",
            "kl_harmful": "the same over the harmful eval prompts",
            "perplexity": "exp(mean NLL per token) of the steered completions under the unsteered model",
            "settings": side})
    metrics = {"n_generations": len(rows), "n_eval_items": len(items), "seeds": list(sp.seeds),
               "side_effects": {f"{s['intervention']}@{s['coefficient']:g}": {
                   k: s[k] for k in ("kl_harmless", "kl_harmful", "perplexity")} for s in side}}
    atomic_write_json(paths.metrics("steer"), metrics)
    write_manifest(paths.manifest("steer"), "steer", [paths.steer_dir, paths.metrics("steer")], paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("steer", run)
