"""Reconstruction metrics of an SAE on stored activations, in float64.

nMSE = sum_t ||x_t - x̂_t||^2 / sum_t ||x_t - x̄||^2, with x̄ the mean activation over the same
tokens: the fraction of variance unexplained (Gao et al. 2024; EleutherAI sparsify's `fvu`),
equal to 1 - sae-lens's `explained_variance` (`sae_lens.evals.ExplainedVarianceCalculator`).

The bootstrap resamples *prompts* with replacement (tokens of one prompt are correlated) and
recomputes the ratio of sums on each draw. It works on per-prompt sufficient statistics, so a
draw costs O(prompts x d_model), not O(tokens x d_model):

    R = sum_p c_p r_p            r_p = sum_{t in p} ||x_t - x̂_t||^2
    N = sum_p c_p n_p            n_p = tokens of p
    S = sum_p c_p s_p            s_p = sum_{t in p} (x_t - mu)
    Q = sum_p c_p q_p            q_p = sum_{t in p} ||x_t - mu||^2
    nMSE = R / (Q - ||S||^2 / N)

where c_p is how often prompt p was drawn, and mu the overall mean (centring first keeps
Q - ||S||^2/N well conditioned; the denominator does not depend on mu).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


@torch.no_grad()
def reconstruct(sae: Any, acts: torch.Tensor, batch_size: int = 4096, return_fired: bool = False):
    """Full reconstruction x̂ = decode(encode(x)) in batches (no error term, no hooks).

    Returns (x̂ float32 [N, d], L0 per token int64 [N]) and, with `return_fired`, a bool [d_sae]
    mask of the latents that fired on at least one token.
    """
    device = sae.W_dec.device
    outs, l0s = [], []
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    was_training = sae.training
    sae.eval()
    try:
        for start in range(0, acts.shape[0], batch_size):
            x = acts[start:start + batch_size].to(device)
            feats = sae.encode(x)
            if feats.is_sparse:
                feats = feats.to_dense()
            x_hat = sae.decode(feats)
            outs.append(x_hat.to("cpu", torch.float32))
            active = (feats != 0).to("cpu")
            l0s.append(active.sum(dim=-1).to(torch.int64))
            fired |= active.any(dim=0)
    finally:
        sae.train(was_training)
    if not outs:
        raise ValueError("reconstruct needs at least one activation row")
    x_hat, l0 = torch.cat(outs), torch.cat(l0s)
    return (x_hat, l0, fired) if return_fired else (x_hat, l0)


@dataclass
class PromptStats:
    """Per-prompt sufficient statistics for the nMSE ratio (float64 numpy)."""

    n: np.ndarray  # [P] tokens per prompt
    resid: np.ndarray  # [P] sum of ||x - x̂||^2
    sq: np.ndarray  # [P] sum of ||x - mu||^2
    s: np.ndarray  # [P, d] sum of (x - mu)


def prompt_stats(x: torch.Tensor, x_hat: torch.Tensor, prompt_index: torch.Tensor) -> PromptStats:
    """Group tokens by prompt (any integer ids; prompts are ordered by id)."""
    if x.shape != x_hat.shape or x.ndim != 2:
        raise ValueError(f"x and x̂ must both be [N, d], got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if prompt_index.shape != (x.shape[0],):
        raise ValueError(f"prompt_index must be [N] = [{x.shape[0]}], got {tuple(prompt_index.shape)}")
    xd = x.to(torch.float64)
    centred = xd - xd.mean(dim=0)
    resid_tok = (xd - x_hat.to(torch.float64)).pow(2).sum(dim=-1)
    _, group = torch.unique(prompt_index, sorted=True, return_inverse=True)
    n_p = int(group.max()) + 1
    n = torch.zeros(n_p, dtype=torch.float64).index_add_(0, group, torch.ones_like(resid_tok))
    resid = torch.zeros(n_p, dtype=torch.float64).index_add_(0, group, resid_tok)
    sq = torch.zeros(n_p, dtype=torch.float64).index_add_(0, group, centred.pow(2).sum(dim=-1))
    s = torch.zeros((n_p, x.shape[1]), dtype=torch.float64).index_add_(0, group, centred)
    return PromptStats(n=n.numpy(), resid=resid.numpy(), sq=sq.numpy(), s=s.numpy())


def _ratio(counts: np.ndarray, st: PromptStats) -> np.ndarray:
    """nMSE for each row of prompt counts [B, P]."""
    n = counts @ st.n
    r = counts @ st.resid
    q = counts @ st.sq
    s = counts @ st.s
    denom = q - np.einsum("bd,bd->b", s, s) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, r / np.where(denom > 0, denom, 1.0), np.inf)


def nmse_from_stats(st: PromptStats) -> float:
    return float(_ratio(np.ones((1, st.n.shape[0])), st)[0])


def bootstrap_prompts(statistic: Callable[[np.ndarray], np.ndarray], n_prompts: int, samples: int, seed: int,
                      level: float, chunk: int = 256) -> tuple[float, float]:
    """Percentile bootstrap CI at `level` of a statistic of per-prompt sums, resampling prompts with
    replacement: `statistic` maps prompt counts [B, P] (how often each prompt was drawn) to B values.

    Draws come from `numpy.random.default_rng(seed)` in a fixed order, so the CI is a pure function of
    (statistic, samples, seed, level). The one prompt-level bootstrap of the reconstruction gate.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        draws = rng.integers(0, n_prompts, size=(b, n_prompts))
        flat = (np.arange(b)[:, None] * n_prompts + draws).ravel()
        counts = np.bincount(flat, minlength=b * n_prompts).reshape(b, n_prompts).astype(np.float64)
        values.append(statistic(counts))
    boot = np.concatenate(values)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_nmse(st: PromptStats, samples: int, seed: int, level: float, chunk: int = 256) -> tuple[float, float]:
    """Percentile bootstrap CI of nMSE at `level`, resampling prompts with replacement."""
    return bootstrap_prompts(lambda counts: _ratio(counts, st), st.n.shape[0], samples, seed, level, chunk)


@dataclass
class ReconstructionResult:
    nmse: float
    ci: tuple[float, float]
    cosine: float  # mean over tokens of cos(x, x̂)
    l2_ratio: float  # mean over tokens of ||x̂|| / ||x||
    l0: float  # mean active latents per token
    n_tokens: int
    n_prompts: int
    dead_latents: int  # latents that fire on none of the tokens
    alive_latents: int  # latents that fire on at least one

    def as_dict(self) -> dict[str, Any]:
        return {"nmse": self.nmse, "ci": list(self.ci), "cosine": self.cosine, "l2_ratio": self.l2_ratio,
                "l0": self.l0, "explained_variance": 1.0 - self.nmse, "n_tokens": self.n_tokens,
                "n_prompts": self.n_prompts}


def evaluate(sae: Any, x: torch.Tensor, prompt_index: torch.Tensor, bootstrap_samples: int, bootstrap_seed: int,
             ci_level: float, batch_size: int = 4096) -> ReconstructionResult:
    """Every reconstruction metric of one SAE on the given tokens."""
    if x.shape[0] == 0:
        raise ValueError("no tokens to evaluate")
    x_hat, l0, fired = reconstruct(sae, x, batch_size=batch_size, return_fired=True)
    st = prompt_stats(x, x_hat, prompt_index)
    xd, xh = x.to(torch.float64), x_hat.to(torch.float64)
    norm_x, norm_h = xd.norm(dim=-1), xh.norm(dim=-1)
    eps = 1e-12
    cosine = ((xd * xh).sum(dim=-1) / (norm_x * norm_h).clamp_min(eps)).mean()
    l2_ratio = (norm_h / norm_x.clamp_min(eps)).mean()
    return ReconstructionResult(
        nmse=nmse_from_stats(st),
        ci=bootstrap_nmse(st, bootstrap_samples, bootstrap_seed, ci_level),
        cosine=float(cosine),
        l2_ratio=float(l2_ratio),
        l0=float(l0.to(torch.float64).mean()),
        n_tokens=int(x.shape[0]),
        n_prompts=int(st.n.shape[0]),
        dead_latents=int((~fired).sum()),
        alive_latents=int(fired.sum()),
    )


def subset_nmse(sae: Any, x: torch.Tensor, batch_size: int = 4096) -> float:
    """nMSE on a subset of tokens (e.g. the post-instruction positions steering acts on): the same formula,
    with the mean and the variance taken over that subset alone. Not finite when the subset has no variance."""
    x_hat, _ = reconstruct(sae, x, batch_size=batch_size)
    return nmse_from_stats(prompt_stats(x, x_hat, torch.zeros(x.shape[0], dtype=torch.long)))
