"""`collect`: run the model on the locked eval set; store activations per required tuple and
greedy baseline generations.

Refuses to run when the resolved eval set differs from data/eval.lock, or when
selection and eval leak into each other. Activations stream to disk batch by batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from sasgate.activations import POST_INSTRUCTION_FILE, StreamingTensorWriter, save_post_instruction, write_token_index
from sasgate.artifacts import atomic_dir, atomic_write_json, write_manifest
from sasgate.device import compute_record
from sasgate.evalset import EvalItem, check_lock, resolve_eval_set
from sasgate.modeling import ChatModel, load_chat_model
from sasgate import instructions
from sasgate.params import LOCAL_MODEL, Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

SPLITS = ("selection", "eval")


def _batches(items: list[EvalItem], size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _token_rows(mask: torch.Tensor, first_prompt: int, n_post: int) -> dict[str, torch.Tensor]:
    """Index of the stored (non-pad) tokens of one left-padded batch, in row-major order."""
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    position = (mask.cumsum(dim=1) - 1)[mask]
    prompt = (torch.arange(mask.shape[0]) + first_prompt).unsqueeze(1).expand_as(mask)[mask]
    from_end = position - lengths.repeat_interleave(lengths)  # -n .. -1
    post = torch.where(from_end >= -n_post, from_end, torch.zeros_like(from_end))
    return {"prompt_index": prompt.long(), "position": position.long(),
            "is_bos": (position == 0).to(torch.uint8), "post_instruction": post.long()}


def stream_capture(model, batches, writers: dict[str, StreamingTensorWriter], stop_at_layer: int) -> None:
    """Run each (ids, mask) batch once, up to `stop_at_layer`, appending the non-pad rows of every
    hooked activation to its writer: the one capture loop (the benchmarks time it against a bare
    forward and sae-lens's activation cache)."""
    rows: list[torch.Tensor] = []  # flat indices of the batch's non-pad tokens, found once per batch

    def save(act: torch.Tensor, hook) -> None:
        writers[hook.name].write(act.flatten(0, 1).index_select(0, rows[0]))

    # hooks attached once for the whole loop: run_with_hooks would add and remove them every batch
    with torch.inference_mode(), model.hooks(fwd_hooks=[(name, save) for name in writers]):
        for ids, mask in batches:
            rows[:] = [mask.bool().flatten().nonzero().squeeze(1).to(ids.device)]
            model(ids, attention_mask=mask, stop_at_layer=stop_at_layer)


def capture_split(chat: ChatModel, items: list[EvalItem], tuples, out: Path, batch_size: int) -> int:
    """Stream the activations of every required tuple for one split; returns the token count."""
    texts = [it.text for it in items]
    encoded = [chat.encode(batch) for _, batch in _batches(texts, batch_size)]
    n_tokens = sum(int(mask.sum()) for _, mask in encoded)
    writers = {t.hook_name: StreamingTensorWriter(out / f"{t.key}.safetensors", n_tokens, chat.model.cfg.d_model)
               for t in tuples}
    bar = tqdm(encoded, desc=f"collect {out.name}", unit="batch", leave=False)
    stream_capture(chat.model, bar, writers, max(t.layer for t in tuples) + 1)
    for w in writers.values():
        w.close()
    index_parts = [_token_rows(mask.cpu(), start, chat.n_post_instruction)
                   for start, (_, mask) in zip(range(0, len(texts), batch_size), encoded)]
    write_token_index(out / "tokens.safetensors",
                      {k: torch.cat([p[k] for p in index_parts]) for k in index_parts[0]})
    return n_tokens


# --- post-instruction resid_pre at every layer, for DIM candidates (issue 3) ---
@torch.no_grad()
def capture_post_instruction(chat: ChatModel, items: list[EvalItem], batch_size: int) -> torch.Tensor:
    """[n_prompts, n_layers, n_post, d_model]: resid_pre of every block at the post-instruction positions
    (the last n_post tokens of each left-padded prompt); what `directions` builds its candidates from."""
    model = chat.model
    n_post = chat.n_post_instruction
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    grabbed: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook) -> None:
        grabbed[hook.name] = act[:, -n_post:].to("cpu", torch.float32)

    parts = []
    for _, batch in _batches([it.text for it in items], batch_size):
        ids, mask = chat.encode(batch)
        model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(n, grab) for n in names],
                             stop_at_layer=model.cfg.n_layers)
        parts.append(torch.stack([grabbed[n] for n in names], dim=1))
    return torch.cat(parts)


def _refusal_or_none(chat: ChatModel, completion: str) -> bool | None:
    try:
        return chat.is_refusal(completion)
    except NotImplementedError:
        return None  # Hub models: the versioned scorer decides, not the organism's own test


def write_generations(chat: ChatModel, items: list[EvalItem], path: Path, batch_size: int,
                      max_new_tokens: int) -> dict[str, dict[str, float]]:
    """Greedy baseline completions, one JSON line per item; returns refusal rates per split/label."""
    counts: dict[tuple[str, str], list[int]] = {}
    with open(path, "w", encoding="utf-8") as fh:
        for _, batch in tqdm(list(_batches(items, batch_size)), desc="baseline generations", unit="batch",
                             leave=False):
            completions = chat.generate([it.text for it in batch], max_new_tokens=max_new_tokens)
            for it, completion in zip(batch, completions):
                refused = _refusal_or_none(chat, completion)
                fh.write(json.dumps({"id": it.id, "completion": completion, "refusal": refused},
                                    sort_keys=True) + "\n")
                if refused is not None:
                    c = counts.setdefault((it.split, it.label), [0, 0])
                    c[0] += int(refused)
                    c[1] += 1
    rates: dict[str, dict[str, float]] = {}
    for (split, label), (k, n) in sorted(counts.items()):
        rates.setdefault(split, {})[label] = round(k / n, 6)
    return rates


def run(params: Params, paths: Paths) -> dict:
    items = resolve_eval_set(params, paths)
    check_lock(items, params, paths)
    if params.model.name == LOCAL_MODEL:  # the organism's data and the SAE corpus never hold an eval prompt
        instructions.disjoint_from(instructions.every_instruction(), [it.text for it in items])
    chat = load_chat_model(params, paths)
    size = params.collect.batch_size
    tokens: dict[str, int] = {}
    with atomic_dir(paths.collect_dir) as out:
        with open(out / "items.jsonl", "w", encoding="utf-8") as fh:
            for it in items:
                fh.write(json.dumps(it.model_dump(mode="json"), sort_keys=True) + "\n")
        for split in SPLITS:
            (out / split).mkdir()
            tokens[split] = capture_split(chat, [it for it in items if it.split == split], params.tuples,
                                          out / split, size)
        selection = [it for it in items if it.split == "selection"]  # DIM candidates come from selection only
        save_post_instruction(out / "selection" / POST_INSTRUCTION_FILE, capture_post_instruction(chat, selection, size))
        refusal = write_generations(chat, items, out / "generations.jsonl", size, params.collect.max_new_tokens)
    metrics = {"n_items": {s: sum(it.split == s for it in items) for s in SPLITS},
               "n_tokens": tokens, "tuples": params.tuple_keys, "baseline_refusal_rate": refusal,
               "compute": compute_record(params)}  # device and dtype the activations were computed with
    atomic_write_json(paths.metrics("collect"), metrics)
    write_manifest(paths.manifest("collect"), "collect", [paths.collect_dir, paths.metrics("collect")], paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("collect", run)
