"""Deterministic training of the `toy-refusal` model organism.

The corpus is drawn from the grammar's *train* pairs only (the eval, selection
and validation pairs are held out), one chat transcript per sequence:

    <bos> <user> {instruction} <eoi> <assistant> {response} <eos>

Harmful instructions get one of the refusal phrasings, harmless ones an answer.
The loss weights response tokens (everything predicted after `<assistant>`,
`<eos>` included) 1.0 and prompt tokens `PROMPT_LOSS_WEIGHT`, so the model also
learns the prompt distribution (which the SAEs are later trained on).

Determinism: the corpus comes from a seeded `random.Random`, weights from
HookedTransformerConfig's seed, batches from a seeded `torch.Generator`; the
stage runner has already set `torch.use_deterministic_algorithms(True)` and the
thread count.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig

from ..modeling import new_hooked_transformer
from ..params import Params, ToyModelParams
from . import grammar
from .tokenizer import BOS, PAD, build_tokenizer, encode

PROMPT_LOSS_WEIGHT = 0.1
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
TOY_NAME = "toy-refusal"
CONFIG_SCHEMA = "sasgate.toy_model/1"
# HookedTransformerConfig fields recorded in config.json: enough to rebuild the model.
ARCH_FIELDS = (
    "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "act_fn",
    "normalization_type", "positional_embedding_type", "attn_only", "original_architecture",
)


def train_pairs(params: Params) -> list[grammar.Pair]:
    """The (verb, object) pairs the organism may see: the grammar's train split."""
    e = params.eval
    return grammar.partition_pairs(e.seed, e.n_eval, e.n_selection, params.model.toy.n_validation)["train"]


def validation_pairs(params: Params) -> list[grammar.Pair]:
    e = params.eval
    return grammar.partition_pairs(e.seed, e.n_eval, e.n_selection, params.model.toy.n_validation)["validation"]


def transcript(pair: grammar.Pair, template: int, variant: int) -> str:
    return f"{BOS} {grammar.chat_prompt(grammar.instruction(pair, template))} {grammar.response(pair, variant)} {grammar.EOS}"


def build_corpus(params: Params) -> list[str]:
    """`corpus_size` transcripts, classes alternating, templates and response variants cycled.

    Sequence i uses template i mod 8 and response variant (i div 8) mod the class's pool
    size, so every template and variant appears; the pair is drawn from a seeded RNG.
    """
    toy = params.model.toy
    pairs = train_pairs(params)
    by_label = {lab: [p for p in pairs if p.label == lab] for lab in ("harmful", "harmless")}
    rng = random.Random(f"sasgate.toy.corpus:{toy.seed}")
    n_t = len(grammar.TEMPLATES)
    corpus = []
    for i in range(toy.corpus_size):
        label = "harmful" if i % 2 == 0 else "harmless"
        pair = rng.choice(by_label[label])
        k = i // 2
        corpus.append(transcript(pair, k % n_t, k // n_t))
    return corpus


def encode_corpus(tok: Tokenizer, corpus: list[str], n_ctx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [N, L] right-padded with <pad>, lengths [N], target weights [N, L-1])."""
    encoded = [encode(tok, s) for s in corpus]
    longest = max(len(e) for e in encoded)
    if longest > n_ctx:
        raise ValueError(f"a training transcript has {longest} tokens, more than model.toy.n_ctx = {n_ctx}")
    pad = tok.token_to_id(PAD)
    assistant = tok.token_to_id(grammar.ASSISTANT)
    ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
    weights = torch.zeros((len(encoded), longest - 1), dtype=torch.float32)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        start = e.index(assistant)  # targets at index >= start are the response (+ <eos>)
        weights[i, : len(e) - 1] = PROMPT_LOSS_WEIGHT
        weights[i, start : len(e) - 1] = 1.0
    lengths = torch.tensor([len(e) for e in encoded])
    return ids, lengths, weights


def hooked_config(toy: ToyModelParams, d_vocab: int, device: str, seed: int | None) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=toy.n_layers,
        d_model=toy.d_model,
        n_heads=toy.n_heads,
        d_head=toy.d_model // toy.n_heads,
        d_mlp=toy.d_mlp,
        n_ctx=toy.n_ctx,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture=None,
        seed=seed,
        device=device,
    )


def _lr_at(step: int, total: int, lr: float) -> float:
    """Linear warmup, then cosine decay to FINAL_LR_FRACTION of the peak."""
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    model: HookedTransformer
    tokenizer: Tokenizer
    final_loss: float  # mean weighted loss over the last 5% of steps
    losses: list[float] = field(repr=False)
    corpus_size: int = 0


def train_toy(params: Params) -> TrainResult:
    """Train `toy-refusal` from params: a pure function of params (same params, same weights)."""
    toy = params.model.toy
    device = params.runtime.device
    tok = build_tokenizer()
    corpus = build_corpus(params)
    ids, lengths, weights = encode_corpus(tok, corpus, toy.n_ctx)

    model = new_hooked_transformer(hooked_config(toy, tok.get_vocab_size(), device, toy.seed))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": toy.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=toy.lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(toy.seed)
    n = ids.shape[0]
    order = torch.randperm(n, generator=gen)
    cursor = 0
    losses: list[float] = []
    for step in range(toy.train_steps):
        if cursor + toy.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + toy.batch_size]
        cursor += toy.batch_size
        width = int(lengths[idx].max())
        batch = ids[idx, :width].to(device)
        w = weights[idx, : width - 1].to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, toy.train_steps, toy.lr)
        logits = model(batch, return_type="logits")[:, :-1]
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        loss = (per_token * w.reshape(-1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-max(1, len(losses) // 20) :]
    return TrainResult(model=model, tokenizer=tok, final_loss=sum(tail) / len(tail), losses=losses, corpus_size=n)


def model_config(model: HookedTransformer, tok: Tokenizer) -> dict[str, Any]:
    """config.json: the architecture fields plus the tokenizer facts; no paths, no timestamps."""
    cfg = model.cfg
    arch = {k: getattr(cfg, k) for k in ARCH_FIELDS}
    return {
        "schema": CONFIG_SCHEMA,
        "name": TOY_NAME,
        "hooked_transformer_config": arch,
        "tokenizer": {
            "file": "tokenizer.json",
            "vocab_size": tok.get_vocab_size(),
            "pad_token": PAD,
            "bos_token": BOS,
            "eos_token": grammar.EOS,
            "unk_token": "<unk>",
            "special_tokens": list(grammar.SPECIAL_TOKENS),
            "post_instruction_tokens": list(grammar.POST_INSTRUCTION),
            "chat_template": grammar.chat_prompt("{instruction}"),
        },
        "n_post_instruction": len(grammar.POST_INSTRUCTION),
    }
