"""Activation capture: `collect` against the bare forward (the physical limit) and against
sae-lens's own activation cache (the peer), on the same model, batches and tokens.

* collect vs bare: `capture_split` (tokenize, forward with hooks, stream every required tuple
  to safetensors, token index) over the default eval set, against the model's forward alone on
  the same pre-tokenized batches, up to the same layer. Target <= 1.15 on the toy; <= 1.05 on
  SmolLM2 (bench_smollm2.py: a real model's forward dominates what collect adds around it).
* sae-lens vs collect: packed rows of `n_ctx` tokens (sae-lens's input form), one hook (it caches
  one hook per run), batch size `collect.batch_size`. sae-lens: `CacheActivationsRunner.run()`
  (its ActivationsStore forward, Arrow shards, consolidation) with our model in place of the
  one it would download; collect: `stream_capture` with a full mask into a safetensors writer.
  Target: sae-lens time / collect time >= 1.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from .common import Result, best, runs, side_by_side


def _eval_items(params, paths):
    from sasgate.evalset import resolve_eval_set

    return resolve_eval_set(params, paths)


def spread(items: list, n: int | None) -> list:
    """n items evenly spaced over `items` (sorted by split, label, source, paraphrase: an even spacing keeps
    both splits and both labels, and so the mix of prompt lengths), all of them when n is None or too big."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def collect_vs_bare(params, paths, chat, work: Path, repeats: int, *, n_prompts: int | None = None,
                    target: float = 1.15, label: str = "") -> Result:
    """`capture_split` / the bare forward on the eval set (`n_prompts` of it, evenly spaced, when given)
    of `params`, with `chat` (the toy or a real model); `label` prefixes the row's name."""
    from sasgate.stages.collect import _batches, capture_split

    items = spread(_eval_items(params, paths), n_prompts)
    size = params.collect.batch_size
    stop_at = max(t.layer for t in params.tuples) + 1
    encoded = [chat.encode(batch) for _, batch in _batches([it.text for it in items], size)]
    out = work / "capture"

    def collect() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        capture_split(chat, items, params.tuples, out, size)

    def bare() -> None:
        with torch.inference_mode():
            for ids, mask in encoded:
                chat.model(ids, attention_mask=mask, stop_at_layer=stop_at)

    t = side_by_side({"collect": collect, "bare": bare}, repeats)
    ratio = best(t["collect"]) / best(t["bare"])
    n_tok = sum(int(m.sum()) for _, m in encoded)
    return Result(f"{label}collect / bare forward", ratio, f"<= {target:g}", ratio <= target,
                  f"{len(items)} prompts, {n_tok} tokens, {len(params.tuples)} tuples to layer {stop_at - 1}; "
                  f"collect {runs(t['collect'])} s, bare {runs(t['bare'])} s")


def packed_rows(chat, items, n_rows: int) -> torch.Tensor:
    """[n_rows, n_ctx] token ids: the chat prompts (BOS + template) back to back, cut into rows."""
    flat: list[int] = []
    while len(flat) < n_rows * chat.n_ctx:
        for it in items:
            flat += chat.prompt_ids(it.text)
    return torch.tensor(flat[: n_rows * chat.n_ctx], dtype=torch.long).view(n_rows, chat.n_ctx)


def _sae_lens_runner(chat, dataset, hook: str, batch: int, out: Path):
    """sae-lens's CacheActivationsRunner on our in-memory model: its __init__ minus `load_model`,
    which would fetch a model by name (the toy is not on the Hub)."""
    from datasets import Array2D, Features, Sequence, Value
    from sae_lens.cache_activations_runner import CacheActivationsRunner, _mk_activations_store
    from sae_lens.config import CacheActivationsRunnerConfig

    n_rows, ctx = len(dataset), len(dataset[0]["input_ids"])
    d_model = int(chat.model.cfg.d_model)
    buffer_rows = batch * 8
    cfg = CacheActivationsRunnerConfig(
        dataset_path="sasgate-bench", model_name="toy-refusal", model_batch_size=batch, hook_name=hook,
        d_in=d_model, training_tokens=n_rows * ctx, context_size=ctx, new_cached_activations_path=str(out),
        shuffle=False, dtype="float32", device=str(chat.device), prepend_bos=False, streaming=False,
        buffer_size_gb=buffer_rows * ctx * d_model * 4 / 1e9)
    runner = CacheActivationsRunner.__new__(CacheActivationsRunner)
    runner.cfg, runner.model = cfg, chat.model
    runner.activations_store = _mk_activations_store(
        chat.model, cfg, override_dataset=dataset)
    runner.context_size = ctx
    runner.features = Features({hook: Array2D(shape=(ctx, d_model), dtype="float32"),
                                "token_ids": Sequence(Value(dtype="int32"), length=ctx)})
    return runner


def sae_lens_vs_collect(params, paths, chat, work: Path, repeats: int, n_rows: int) -> Result:
    import logging

    import datasets

    from sasgate.activations import StreamingTensorWriter
    from sasgate.stages.collect import stream_capture

    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    # its store warns that 1024 rows are "fewer samples than tokens" (it reads each row once) and
    # about a tensor copy inside it: noise for this table
    warnings.filterwarnings("ignore", category=UserWarning, module=r"sae_lens\.")
    tp = max(params.tuples, key=lambda t: t.layer)
    size = params.collect.batch_size
    items = _eval_items(params, paths)
    rows = packed_rows(chat, items, n_rows).to(chat.device)
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()})  # its input, built once (untimed)
    full = torch.ones_like(rows, dtype=torch.bool)
    ours, peer = work / "ours", work / "sae_lens"
    d_model = int(chat.model.cfg.d_model)

    def collect() -> None:
        shutil.rmtree(ours, ignore_errors=True)
        writer = StreamingTensorWriter(ours / "acts.safetensors", rows.numel(), d_model)
        batches = ((rows[s:s + size], full[s:s + size]) for s in range(0, n_rows, size))
        stream_capture(chat.model, batches, {tp.hook_name: writer}, tp.layer + 1)
        writer.close()

    def sae_lens() -> None:
        shutil.rmtree(peer, ignore_errors=True)
        _sae_lens_runner(chat, dataset, tp.hook_name, size, peer).run()

    t = side_by_side({"collect": collect, "sae_lens": sae_lens}, repeats)
    ratio = best(t["sae_lens"]) / best(t["collect"])
    return Result("sae-lens cache / collect", ratio, ">= 1", ratio >= 1.0,
                  f"{n_rows} rows x {rows.shape[1]} tokens, hook {tp.hook_name}; "
                  f"sae-lens {runs(t['sae_lens'])} s, collect {runs(t['collect'])} s")
