"""Difference-in-means (DIM) refusal directions and Arditi et al. 2024's selection rule.

Candidates: for every layer l and post-instruction position i, r_{l,i} = mean(harmful) -
mean(harmless) of the residual stream entering block l (`resid_pre`), over the selection split.

Each candidate is scored on selection prompts (Arditi et al., "Refusal in Language Models Is
Mediated by a Single Direction", appendix C; `select_direction` in their code):

* `ablation_score`: mean refusal score on harmful prompts with r^ ablated at every layer and position;
* `induce_score`: mean refusal score on harmless prompts with r added (raw, coefficient 1) at layer l;
* `kl`: mean KL(unsteered || ablated) of the last-position next-token distribution on harmless prompts.

The refusal score is the log-odds of the refusal tokens' total probability at the last prompt
position: log(p + eps) - log(1 - p + eps), eps = 1e-8, as in their code.

Rule: discard candidates in the last `prune_layer_fraction` of layers (l >= int(n_layers * (1 - f))),
with `kl > kl_threshold`, with `induce_score < induce_threshold`, or with a non-finite score; of
the rest, take the lowest `ablation_score`.

Data, as in their code: the selection split is cut by source into a build part (the difference in
means) and a validation part (the three scores), after dropping prompts whose unsteered refusal score
contradicts their label (harmful < 0, harmless > 0: `contradicts_label`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .artifacts import read_json
from .errors import ArtifactError, ParamsError, SelectionError
from .interventions import Hook, addition, directional_ablation, resid_pre_hook
from .params import DirectionsParams

EPS = 1e-8


def mean_difference(acts: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
    """mean(acts[harmful]) - mean(acts[~harmful]) over the first axis, computed in float64, float32 out."""
    harmful = harmful.bool()
    if acts.shape[0] != harmful.shape[0]:
        raise ValueError(f"{acts.shape[0]} activation rows but {harmful.shape[0]} labels")
    if not harmful.any() or harmful.all():
        raise ValueError("the difference in means needs prompts of both classes")
    x = acts.to(torch.float64)
    return (x[harmful].mean(dim=0) - x[~harmful].mean(dim=0)).to(torch.float32)


def refusal_token_ids(encode: Callable[[str], list[int]], tokens: Sequence[str]) -> list[int]:
    """The token id of each refusal token; each must encode to exactly one token."""
    ids = []
    for t in tokens:
        enc = encode(t)
        if len(enc) != 1:
            raise ParamsError(f"directions.refusal_tokens: {t!r} encodes to {len(enc)} tokens {enc}, not one")
        ids.append(int(enc[0]))
    if not ids:
        raise ParamsError("directions.refusal_tokens must name at least one token")
    return sorted(set(ids))


def refusal_score(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """Per row: log-odds of the refusal tokens' total probability (float64)."""
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    p = probs[:, list(refusal_ids)].sum(dim=-1)
    return torch.log(p + EPS) - torch.log(1 - p + EPS)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per row: KL(P || Q) of the next-token distributions given by two logit tensors (float64, nats)."""
    lp = torch.log_softmax(p_logits.to(torch.float64), dim=-1)
    lq = torch.log_softmax(q_logits.to(torch.float64), dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1)


@torch.no_grad()
def last_logits(chat: Any, texts: Sequence[str], hooks: Sequence[Hook] = (), batch_size: int = 64) -> torch.Tensor:
    """Float32 logits [N, d_vocab] at the last prompt position of each instruction's chat prompt."""
    model = chat.model
    out = []
    with model.hooks(fwd_hooks=list(hooks)):
        for start in range(0, len(texts), batch_size):
            ids, mask = chat.encode(list(texts[start:start + batch_size]))
            logits = model(ids, attention_mask=mask.long(), return_type="logits")
            out.append(logits[:, -1, :].to("cpu", torch.float32))
    return torch.cat(out)


def score_candidates(chat: Any, directions: torch.Tensor, positions: Sequence[int], harmful: Sequence[str],
                     harmless: Sequence[str], refusal_ids: Sequence[int], batch_size: int = 64,
                     progress: Callable[[Any], Any] = iter, layers: Sequence[int] | None = None,
                     ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Arditi's three scores for every candidate direction [n_layers, n_positions, d_model]; with `layers`
    (directions.candidate_layers) only those layers' candidates are scored, the rest recorded unscored.

    Returns (one dict per candidate, baseline scores without any intervention).
    """
    model = chat.model
    base_harmless = last_logits(chat, harmless, (), batch_size)
    base_harmful = last_logits(chat, harmful, (), batch_size)
    baseline = {"refusal_score_harmful": float(refusal_score(base_harmful, refusal_ids).mean()),
                "refusal_score_harmless": float(refusal_score(base_harmless, refusal_ids).mean())}
    cells = [(layer, j) for layer in range(directions.shape[0]) for j in range(directions.shape[1])]
    scored = set(range(directions.shape[0]) if layers is None else layers)
    out = []
    for layer, j in progress(cells):
        r = directions[layer, j]
        scores: dict[str, float | None] = dict.fromkeys(("kl", "induce_score", "ablation_score"))
        if layer not in scored:
            out.append({"layer": layer, "position": int(positions[j]), "norm": float(r.norm()), **scores,
                        "skipped": True})
            continue
        if bool(torch.isfinite(r).all()) and float(r.norm()) > 0:  # a zero direction names nothing to score
            ablate = directional_ablation(model, r)
            add = addition(resid_pre_hook(layer), r, 1.0)
            scores = {
                "kl": kl_divergence(base_harmless, last_logits(chat, harmless, ablate, batch_size)).mean(),
                "induce_score": refusal_score(last_logits(chat, harmless, add, batch_size), refusal_ids).mean(),
                "ablation_score": refusal_score(last_logits(chat, harmful, ablate, batch_size), refusal_ids).mean(),
            }
            scores = {k: float(v) if math.isfinite(float(v)) else None for k, v in scores.items()}
        out.append({"layer": layer, "position": int(positions[j]), "norm": float(r.norm()), **scores})
    return out, baseline


def contradicts_label(score: float, harmful: bool) -> bool:
    """Arditi et al.'s filter: a harmful prompt the unsteered model does not refuse (score < 0), or a harmless
    one it refuses (score > 0), cannot show what the refusal direction does."""
    return score < 0 if harmful else score > 0


def discard_reasons(c: dict[str, Any], n_layers: int, dp: DirectionsParams) -> list[str]:
    """Why Arditi's rule discards a candidate (empty: kept)."""
    if c.get("skipped"):
        return ["unscored: its layer is not in directions.candidate_layers"]
    missing = [k for k in ("kl", "induce_score", "ablation_score") if c[k] is None]
    if missing:
        why = "the direction is zero or not finite" if len(missing) == 3 else f"{', '.join(missing)} not finite"
        return [f"unscored: {why}"]
    reasons = []
    cutoff = int(n_layers * (1.0 - dp.prune_layer_fraction))
    if c["layer"] >= cutoff:
        reasons.append(f"layer {c['layer']} is in the last {dp.prune_layer_fraction:.0%} of layers (>= {cutoff})")
    if c["kl"] > dp.kl_threshold:
        reasons.append(f"ablation moves harmless next-token distributions by KL {c['kl']:.4g} > {dp.kl_threshold}")
    if c["induce_score"] < dp.induce_threshold:
        reasons.append(f"addition does not induce refusal: induce score {c['induce_score']:.4g} < "
                       f"{dp.induce_threshold}")
    return reasons


def select(candidates: list[dict[str, Any]], n_layers: int, dp: DirectionsParams
           ) -> tuple[list[dict[str, Any]], int, bool]:
    """Annotate every candidate with kept / reasons; return them, the chosen one's index, and whether the rule
    was satisfied. With no survivor the candidate failing the fewest criteria is returned, flagged
    (satisfied False): the behaviour gate then fails closed, naming why, instead of the pipeline stopping
    with no decision. With no scorable candidate at all there is nothing to steer with: SelectionError."""
    annotated = []
    for c in candidates:
        reasons = discard_reasons(c, n_layers, dp)
        annotated.append({**c, "kept": not reasons, "reasons": reasons})
    kept = [i for i, c in enumerate(annotated) if c["kept"]]
    satisfied = bool(kept)
    if not kept:
        kept = [i for i, c in enumerate(annotated) if not c["reasons"][0].startswith("unscored")]
        if not kept:
            raise SelectionError(f"no DIM candidate could be scored ({len(candidates)} candidates, every one zero or "
                                 "not finite): there is no direction to steer with")
        fewest = min(len(annotated[i]["reasons"]) for i in kept)
        kept = [i for i in kept if len(annotated[i]["reasons"]) == fewest]
    chosen = min(kept, key=lambda i: (annotated[i]["ablation_score"], i))
    for i, c in enumerate(annotated):
        c["chosen"] = i == chosen
    return annotated, chosen, satisfied


# --------------------------------------------------------------------------- the `directions` artifact

VECTORS_FILE = "directions.safetensors"
RECORD_FILE = "selection.json"


def load_direction(directions_dir: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(the chosen DIM direction [d_model], the selection record) that `directions` wrote."""
    from safetensors.torch import load_file

    record = read_json(directions_dir / RECORD_FILE)
    try:
        r = load_file(str(directions_dir / VECTORS_FILE))["direction"]
    except Exception as exc:
        raise ArtifactError(f"missing or corrupt {directions_dir / VECTORS_FILE} (run `dvc repro directions`): "
                            f"{exc}") from None
    return r, record
