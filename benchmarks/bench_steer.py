"""Steering generation: `steer`'s batched hooked generation against one prompt at a time.

Both use `ChatModel.generate` with the same hooks (a DIM-style addition at resid_pre of the middle
layer), the same sampling settings and `steer.max_new_tokens` from params.yaml, on the default
eval split's prompts; batched in `steer.batch_size`. Target: one-at-a-time time / batched time >= 4
on the toy, >= 3 on SmolLM2 (bench_smollm2.py, whose docstring says why it is lower).
"""

from __future__ import annotations

import torch

from .common import Result, best, runs, side_by_side


def batched_vs_single(params, paths, chat, repeats: int, n_prompts: int, *, target: float = 4.0,
                      label: str = "", spread_prompts: bool = False) -> Result:
    """One-at-a-time / batched generation of `n_prompts` eval-split prompts of `params` with `chat` (the toy
    or a real model): the first ones, or evenly spaced over the split with `spread_prompts` (both labels);
    `label` prefixes the row's name."""
    from sasgate.evalset import resolve_eval_set
    from sasgate.interventions import addition, resid_pre_hook

    from .bench_collect import spread

    sp = params.steer
    evals = [it.text for it in resolve_eval_set(params, paths) if it.split == "eval"]
    texts = spread(evals, n_prompts) if spread_prompts else evals[:n_prompts]
    gen = torch.Generator().manual_seed(0)
    vector = torch.randn(int(chat.model.cfg.d_model), generator=gen).to(chat.device)
    hooks = addition(resid_pre_hook(int(chat.model.cfg.n_layers) // 2), vector, 1.0)
    kw = dict(max_new_tokens=sp.max_new_tokens, hooks=hooks, do_sample=sp.do_sample, temperature=sp.temperature)

    def batched() -> None:
        for b, s in enumerate(range(0, len(texts), sp.batch_size)):
            chat.generate(texts[s:s + sp.batch_size], seed=b, **kw)

    def single() -> None:
        for i, text in enumerate(texts):
            chat.generate([text], seed=i, **kw)

    t = side_by_side({"batched": batched, "single": single}, repeats)
    ratio = best(t["single"]) / best(t["batched"])
    return Result(f"{label}steer one-at-a-time / batched", ratio, f">= {target:g}", ratio >= target,
                  f"{len(texts)} prompts, batch {sp.batch_size}, {sp.max_new_tokens} new tokens; "
                  f"batched {runs(t['batched'])} s, single {runs(t['single'])} s")
