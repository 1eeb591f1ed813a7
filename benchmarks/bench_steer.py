"""Steering generation: `steer`'s batched hooked generation against one prompt at a time.

Both use `ChatModel.generate` with the same hooks (a DIM-style addition at resid_pre of the middle
layer), the same sampling settings and `steer.max_new_tokens` from params.yaml, on the default
eval split's prompts; batched in `steer.batch_size`. Target: one-at-a-time time / batched time >= 4.
"""

from __future__ import annotations

import torch

from .common import Result, best, runs, side_by_side


def batched_vs_single(params, paths, chat, repeats: int, n_prompts: int) -> Result:
    from sasgate.evalset import resolve_eval_set
    from sasgate.interventions import addition, resid_pre_hook

    sp = params.steer
    texts = [it.text for it in resolve_eval_set(params, paths) if it.split == "eval"][:n_prompts]
    gen = torch.Generator().manual_seed(0)
    vector = torch.randn(int(chat.model.cfg.d_model), generator=gen)
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
    return Result("steer one-at-a-time / batched", ratio, ">= 4", ratio >= 4.0,
                  f"{len(texts)} prompts, batch {sp.batch_size}, {sp.max_new_tokens} new tokens; "
                  f"batched {runs(t['batched'])} s, single {runs(t['single'])} s")
