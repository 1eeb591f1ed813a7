"""Spliced-in reconstruction metrics (ARCHITECTURE.md §5, "The reconstruction gate"): what the model's
next-token predictions do when an SAE's reconstruction replaces the activation at its hook.

nMSE says how far x̂ is from x; it does not say whether the model still works on x̂ (sae-lens's evals,
Gemma Scope, Gao et al. and SAEBench all report this too). One forward pass per intervention, all
positions of the token set substituted at once, the rest of the model left as it is:

* clean: no intervention; spliced: x -> decode(encode(x)); zero: x -> 0; mean: x -> the mean activation
  over the token set; eps-random: x -> x + δ, δ a seeded Gaussian direction scaled to ||x - x̂|| per token
  (Gurnee 2024: SAE errors move KL more than a random error of the same norm).
* KL(clean || intervention) of the next-token distributions and top-1 agreement: at every substituted position.
* CE of the next prompt token: at substituted positions that have a next prompt token.

Per-token figures are kept per prompt (sums and counts), so every mean has a prompt-level bootstrap CI
the same way nMSE has (sasgate.nmse), and the scores follow sae-lens's definitions:

    ce_loss_score = (ce_zero_ablation - ce_spliced) / (ce_zero_ablation - ce_clean)
    kl_div_score  = (kl_zero_ablation - kl_spliced) / kl_zero_ablation
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .interventions import dense_latents
from .nmse import bootstrap_prompts

INTERVENTIONS = ("spliced", "zero_ablation", "mean_ablation", "eps_random")


@dataclass
class Batch:
    """One left-padded batch: ids [B, T]; attention mask [B, T]; the positions to substitute [B, T] (bool);
    the prompt id of each row [B]."""

    ids: torch.Tensor
    mask: torch.Tensor
    substitute: torch.Tensor
    prompt: torch.Tensor


@dataclass
class _Acc:
    """Per-prompt sums and counts of per-token values, keyed by prompt id."""

    sums: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, prompts: torch.Tensor, values: torch.Tensor) -> None:
        for p, v in zip(prompts.tolist(), values.to(torch.float64).tolist()):
            self.sums[p] = self.sums.get(p, 0.0) + v
            self.counts[p] = self.counts.get(p, 0) + 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keys = sorted(self.counts)
        return (np.array([self.sums[k] for k in keys], dtype=np.float64),
                np.array([self.counts[k] for k in keys], dtype=np.float64))

    def mean(self) -> float:
        s, n = self.arrays()
        return float(s.sum() / n.sum()) if n.sum() > 0 else math.nan


def bootstrap_mean(sums: np.ndarray, counts: np.ndarray, samples: int, seed: int, level: float,
                   chunk: int = 256) -> tuple[float, float]:
    """Percentile CI of sum(values) / count(values), resampling prompts with replacement (as nMSE's CI)."""
    def mean(draws: np.ndarray) -> np.ndarray:
        n = draws @ counts
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n > 0, (draws @ sums) / np.where(n > 0, n, 1.0), np.nan)

    return bootstrap_prompts(mean, sums.shape[0], samples, seed, level, chunk)


def _kl(clean_logp: torch.Tensor, other_logp: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) per row of log-probabilities [N, V]."""
    return (clean_logp.exp() * (clean_logp - other_logp)).sum(dim=-1)


@dataclass
class SplicedResult:
    """Every spliced-in figure of one SAE on one token set."""

    ce: dict[str, float]  # clean, spliced, zero_ablation, mean_ablation, eps_random: mean next-token CE (nats)
    kl: dict[str, float]  # spliced, zero_ablation, mean_ablation, eps_random: mean KL(clean || ...) (nats)
    top1_agreement: float
    delta_ce_ci: tuple[float, float]
    kl_ci: tuple[float, float]
    n_kl_tokens: int
    n_ce_tokens: int

    @property
    def delta_ce(self) -> float:
        return self.ce["spliced"] - self.ce["clean"]

    @property
    def ce_loss_score(self) -> float:
        return (self.ce["zero_ablation"] - self.ce["spliced"]) / (self.ce["zero_ablation"] - self.ce["clean"])

    @property
    def kl_div_score(self) -> float:
        return (self.kl["zero_ablation"] - self.kl["spliced"]) / self.kl["zero_ablation"]

    @property
    def eps_random_kl_ratio(self) -> float:
        return self.kl["spliced"] / self.kl["eps_random"]


def _replace(new: Callable[[torch.Tensor], torch.Tensor], where: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A transformer-lens hook that writes new(act) at the `where` positions [B, T] and leaves the rest."""
    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if act.shape[:2] != where.shape:
            raise ValueError(f"hook activation {tuple(act.shape)} does not fit the position mask {tuple(where.shape)}")
        return torch.where(where.unsqueeze(-1), new(act).to(act.dtype), act)
    return hook


@torch.no_grad()
def spliced_metrics(model: Any, sae: Any, hook_name: str, batches: Iterable[Batch], mean_act: torch.Tensor,
                    seed: int, bootstrap_samples: int, bootstrap_seed: int, ci_level: float) -> SplicedResult:
    """Clean vs SAE-substituted vs zero-, mean- and eps-random-substituted next-token CE and KL at one hook."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # on CPU: the same draws on any device
    ce = {k: _Acc() for k in ("clean", *INTERVENTIONS)}
    kl = {k: _Acc() for k in INTERVENTIONS}
    dce, agree = _Acc(), _Acc()
    mean_act = mean_act.to(device)
    was_training, sae_training = model.training, sae.training
    model.eval()
    sae.eval()

    def recon(x: torch.Tensor) -> torch.Tensor:
        return sae.decode(dense_latents(sae.encode(x.to(sae.W_dec.dtype))))

    try:
        for b in batches:
            ids, mask, sub = b.ids.to(device), b.mask.to(device), b.substitute.to(device)
            bsz, t = ids.shape
            noise = torch.randn((bsz, t, int(mean_act.shape[0])), generator=gen).to(device)

            def eps(x: torch.Tensor) -> torch.Tensor:
                err = (x - recon(x)).norm(dim=-1, keepdim=True)
                return x + noise * (err / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12))

            news: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
                "spliced": recon, "zero_ablation": torch.zeros_like,
                "mean_ablation": lambda x: mean_act.expand_as(x), "eps_random": eps}
            # KL and top-1 at substituted positions; CE where the next position is a prompt token too
            rows = b.prompt.to(device).unsqueeze(1).expand(bsz, t)
            ce_at = sub.clone()
            ce_at[:, -1] = False
            ce_at[:, :-1] &= mask[:, 1:].bool()
            target = torch.roll(ids, -1, dims=1).unsqueeze(-1)
            p_kl, p_ce = rows[sub].cpu(), rows[ce_at].cpu()
            clean = torch.log_softmax(model(ids, attention_mask=mask).float(), dim=-1)
            clean_kl, clean_top = clean[sub], clean[sub].argmax(-1)
            nll_clean = -clean.gather(-1, target).squeeze(-1)[ce_at].cpu()
            ce["clean"].add(p_ce, nll_clean)
            del clean  # one [B, T, vocab] at a time besides this one: Hub vocabularies are large
            for name, fn in news.items():
                out = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(hook_name, _replace(fn, sub))])
                logp = torch.log_softmax(out.float(), dim=-1)
                del out
                kl[name].add(p_kl, _kl(clean_kl, logp[sub]).cpu())
                nll = -logp.gather(-1, target).squeeze(-1)[ce_at].cpu()
                ce[name].add(p_ce, nll)
                if name == "spliced":
                    agree.add(p_kl, (logp[sub].argmax(-1) == clean_top).to(torch.float64).cpu())
                    dce.add(p_ce, nll.to(torch.float64) - nll_clean.to(torch.float64))
                del logp
    finally:
        model.train(was_training)
        sae.train(sae_training)
    s, n = dce.arrays()
    delta_ci = bootstrap_mean(s, n, bootstrap_samples, bootstrap_seed, ci_level)
    s, n = kl["spliced"].arrays()
    kl_ci = bootstrap_mean(s, n, bootstrap_samples, bootstrap_seed, ci_level)
    return SplicedResult(ce={k: a.mean() for k, a in ce.items()}, kl={k: a.mean() for k, a in kl.items()},
                         top1_agreement=agree.mean(), delta_ce_ci=delta_ci, kl_ci=kl_ci,
                         n_kl_tokens=int(sum(agree.counts.values())), n_ce_tokens=int(sum(dce.counts.values())))


def batches_from_index(chat: Any, texts: Sequence[str], index: dict[str, torch.Tensor], batch_size: int) -> list[Batch]:
    """The split's prompts encoded as `collect` encoded them (same batches, left-padded), with the token set
    (every stored non-BOS prompt token) as the positions to substitute. The token index must describe exactly
    these batches (it is what `collect` wrote for them); a mismatch raises ValueError."""
    out: list[Batch] = []
    offset = 0
    for start in range(0, len(texts), batch_size):
        ids, mask = chat.encode(list(texts[start:start + batch_size]))
        flat = mask.bool().cpu().flatten()
        n = int(flat.sum())
        seg = slice(offset, offset + n)
        prompts = index["prompt_index"][seg]
        bsz, t = mask.shape
        expected_prompt = (torch.arange(bsz) + start).unsqueeze(1).expand(bsz, t).flatten()[flat]
        if n == 0 or prompts.shape[0] != n or not torch.equal(prompts, expected_prompt):
            raise ValueError(f"the token index does not describe prompts {start}..{start + bsz - 1} as `collect` "
                             "encodes them")
        sub = torch.zeros(bsz * t, dtype=torch.bool)
        sub[flat.nonzero().squeeze(1)] = ~index["is_bos"][seg].bool()
        out.append(Batch(ids=ids, mask=mask, substitute=sub.view(bsz, t), prompt=torch.arange(bsz) + start))
        offset += n
    if offset != index["prompt_index"].shape[0]:
        raise ValueError(f"the token index has {index['prompt_index'].shape[0]} tokens, the prompts {offset}")
    return out
