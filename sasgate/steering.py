"""The steering grid, its generations and its side effects: one implementation for `calibrate` (selection split)
and `steer` (eval split), so the strengths chosen on one split are applied identically on the other.

Settings (ARCHITECTURE.md, "The behaviour gate"): every arm of `sasgate.behaviour.ARMS` at every strength of
its grid, plus the unsteered baseline. Both methods use unit directions: DIM's chosen direction and the SAS
decoded vector (decode(top-k latent difference) - decode(0)), so an operator treats them alike:

* addition: s * resid_norm * r^ at the compared hook (the SAS tuple's hook), resid_norm being the mean
  residual norm there over the selection split's prompt tokens (BOS excluded);
* directional ablation: x - c (x . r^) r^ at every residual-stream write;
* latent ablation (SAS only): the selected latents scaled by (1 - c) inside the SAE, error term kept.

Side effects per setting, on text the intervention should leave alone: the prompts of the other class
followed by the unsteered model's own greedy completion of each (collect's baseline generations; the
on-distribution text Arditi et al. measure CE on), teacher-forced. `kl` is the mean per-token
KL(unsteered || steered) of the next-token distributions from the last prompt position through the
completion, `ce_delta` the change of the completion tokens' mean NLL. Both are measured for both classes;
the budget reads the off-target class. Success on the judged class never enters the budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import behaviour, sae_io
from .activations import load_acts, load_token_index
from .dim import load_direction
from .errors import ArtifactError
from .evalset import EvalItem
from .interventions import Hook, addition, directional_ablation, sae_latent_ablation, unit
from .modeling import ChatModel
from .params import Params, TupleParams
from .paths import Paths
from .sas import load_steering

SEED_STRIDE = 1_000_003  # generator seed of (seed s, batch b) = s * SEED_STRIDE + b
SIDE_EFFECT_MEASURE = ("mean per-token KL(unsteered || steered), nats, over the last prompt position and every token "
                       "of the unsteered model's own greedy completion, teacher-forced, on the prompts of the class "
                       "the intervention should leave alone (addition: harmful; ablation: harmless)")


@dataclass(frozen=True)
class Setting:
    arm: str  # behaviour.BASELINE or an arm of behaviour.ARMS
    strength: float
    tuple_key: str | None  # where it acts: the compared tuple, or None (baseline, every residual write)
    hooks: list[Hook]


def sas_target(params: Params, paths: Paths) -> tuple[TupleParams, torch.Tensor, list[int]]:
    """(the required tuple SAS steers at, chosen by `features`, its decoded vector, its latent ids): the
    tuple's hook is the compared hook of the addition arms."""
    key, vector, latents, _ = load_steering(paths.features_dir)
    tp = next((t for t in params.tuples if t.key == key), None)
    if tp is None:
        raise ArtifactError(f"features chose tuple {key}, which is not a required tuple in params; rerun `features`")
    return tp, vector, latents


def mean_resid_norm(paths: Paths, tp: TupleParams) -> float:
    """Mean L2 norm of the residual stream at the tuple's hook over the selection split's non-BOS prompt tokens."""
    acts = load_acts(paths, "selection", tp.key)
    keep = ~load_token_index(paths, "selection")["is_bos"]
    norm = float(acts[keep].to(torch.float64).norm(dim=-1).mean())
    if not math.isfinite(norm) or norm <= 0:
        raise ArtifactError(f"the selection activations at {tp.key} have mean norm {norm}; rerun `dvc repro collect`")
    return norm


def build_settings(params: Params, chat: ChatModel, paths: Paths, resid_norm: float,
                   strengths: dict[str, list[float]] | None = None) -> list[Setting]:
    """Baseline first, then every arm at every strength (or at `strengths[arm]` when given)."""
    sp = params.steer
    r_dim, _ = load_direction(paths.directions_dir)
    tp, v_sas, latents = sas_target(params, paths)
    sae, _ = sae_io.load_tuple_sae(paths, tp, device=params.runtime.device)
    unit_dir = {"dim": unit(r_dim), "sas": unit(v_sas)}
    grid = {"addition": sp.add_strengths, "directional_ablation": sp.ablate_strengths,
            "latent_ablation": sp.ablate_strengths}

    def hooks(arm: str, s: float) -> list[Hook]:
        a = behaviour.ARMS[arm]
        if a.operator == "addition":
            return addition(tp.hook_name, unit_dir[a.method], s * resid_norm)
        if a.operator == "directional_ablation":
            return directional_ablation(chat.model, unit_dir[a.method], s)
        return sae_latent_ablation(tp.hook_name, sae, latents, s)

    out = [Setting(behaviour.BASELINE, 0.0, None, [])]
    for arm, a in behaviour.ARMS.items():
        where = tp.key if a.operator != "directional_ablation" else "all"
        for s in (strengths or {}).get(arm, grid[a.operator]):
            out.append(Setting(arm, float(s), where, hooks(arm, float(s))))
    return out


def generate(chat: ChatModel, params: Params, setting: Setting, items: Sequence[EvalItem]) -> list[dict[str, Any]]:
    """Generation rows of one setting over `items` x seeds, batched; the sampling generator is seeded per
    (seed, batch) and is the same for every setting (common random numbers)."""
    sp = params.steer
    rows = []
    for seed in sp.seeds:
        for b in range(0, len(items), sp.batch_size):
            batch = items[b:b + sp.batch_size]
            completions = chat.generate([it.text for it in batch], sp.max_new_tokens, hooks=setting.hooks,
                                        do_sample=sp.do_sample, seed=seed * SEED_STRIDE + b // sp.batch_size,
                                        temperature=sp.temperature)
            for it, comp in zip(batch, completions):
                rows.append(behaviour.GenerationRow(
                    item_id=it.id, source_id=it.source_id, label=it.label, split=it.split,
                    paraphrase_set=it.paraphrase_set, seed=seed, arm=setting.arm, strength=setting.strength,
                    tuple=setting.tuple_key, do_sample=sp.do_sample, temperature=sp.temperature,
                    completion=comp).model_dump(mode="json"))
    return rows


def baseline_completions(paths: Paths) -> dict[str, str]:
    """{item id: the unsteered model's greedy completion} from collect's baseline generations."""
    path = paths.collect_dir / "generations.jsonl"
    try:
        return {r["id"]: r["completion"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"missing or corrupt {path} (run `dvc repro collect`): {exc}") from None


@dataclass
class _Text:
    """Teacher-forced rows: left-padded prompt + completion ids and which positions predict a completion token."""

    ids: torch.Tensor
    mask: torch.Tensor
    scored: torch.Tensor  # [B, T-1] bool: position t predicts token t+1, a completion token (or the first)
    targets: torch.Tensor  # [B, T-1] the token each position predicts


def _teacher_forced(chat: ChatModel, texts: Sequence[str], completions: Sequence[str]) -> _Text:
    rows, n_comp = [], []
    for text, comp in zip(texts, completions):
        p_ids = chat.prompt_ids(text)
        c_ids = chat.codec.encode(comp)[: max(0, chat.n_ctx - len(p_ids))]
        rows.append(p_ids + c_ids)
        n_comp.append(len(c_ids))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), chat.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (r, n) in enumerate(zip(rows, n_comp)):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
        if n:
            scored[i, width - n - 1:] = True  # the last prompt position and every completion position but the last
    return _Text(ids, mask, scored, ids[:, 1:])


class OffTargetText:
    """One class's prompts with the unsteered model's own completions, and the unsteered log-probs over them
    (computed once, reused for every setting)."""

    def __init__(self, chat: ChatModel, items: Sequence[EvalItem], completions: dict[str, str], batch_size: int):
        missing = [it.id for it in items if it.id not in completions]
        if missing:
            raise ArtifactError(f"collect's baseline generations lack {len(missing)} item(s), e.g. {missing[:3]}; "
                                "rerun `dvc repro collect`")
        self.chat = chat
        self.batches = [_teacher_forced(chat, [it.text for it in items[b:b + batch_size]],
                                        [completions[it.id] for it in items[b:b + batch_size]])
                        for b in range(0, len(items), batch_size)]
        self.n_prompts = len(items)
        self.n_tokens = int(sum(int(t.scored.sum()) for t in self.batches))
        if self.n_tokens == 0:
            raise ArtifactError("the off-target text has no tokens to measure side effects on")
        self.base = [self._logp(t, ()) for t in self.batches]

    @torch.no_grad()
    def _logp(self, t: _Text, hooks: Sequence[Hook]) -> torch.Tensor:
        """float64 log-probs [n_scored, vocab] at the scored positions."""
        model = self.chat.model
        with model.hooks(fwd_hooks=list(hooks)):
            logits = model(t.ids.to(self.chat.device), attention_mask=t.mask.to(self.chat.device), return_type="logits")
        return torch.log_softmax(logits[:, :-1].to("cpu", torch.float64), dim=-1)[t.scored]

    @torch.no_grad()
    def measure(self, hooks: Sequence[Hook]) -> dict[str, float]:
        """{kl: mean per-token KL(unsteered || steered), ce_delta: mean NLL steered - unsteered} (nats)."""
        if not hooks:
            return {"kl": 0.0, "ce_delta": 0.0}
        kl = ce = 0.0
        for t, base in zip(self.batches, self.base):
            steered = self._logp(t, hooks)
            kl += float((base.exp() * (base - steered)).sum())
            tgt = t.targets[t.scored][:, None]
            ce += float(base.gather(-1, tgt).sum() - steered.gather(-1, tgt).sum())
        return {"kl": kl / self.n_tokens, "ce_delta": ce / self.n_tokens}


def side_effects(settings: Sequence[Setting], texts: dict[str, OffTargetText], perplexity: Callable[[Setting], Any]
                 = lambda s: (None, None)) -> list[behaviour.SideEffect]:
    """Per setting: kl and ce_delta on each class's text, the budgeted figure on the off-target class, and
    (eval split) the perplexity of its completions, `perplexity(setting) -> (ppl, completion tokens)`."""
    out = []
    for s in settings:
        measured = {lab: texts[lab].measure(s.hooks) for lab in behaviour.LABELS}
        target = None if s.arm == behaviour.BASELINE else behaviour.off_target(s.arm)
        ppl, n_tok = perplexity(s)
        out.append(behaviour.SideEffect(
            arm=s.arm, strength=s.strength, tuple=s.tuple_key, kl={lab: m["kl"] for lab, m in measured.items()},
            ce_delta={lab: m["ce_delta"] for lab, m in measured.items()}, off_target=target,
            side_effect=None if target is None else measured[target]["kl"], perplexity=ppl, completion_tokens=n_tok))
    return out
