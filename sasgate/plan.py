"""`sasgate plan`: what each stage of a params file would load and compute, and the disk and
memory it needs, before anything runs: a Gemma-sized run is sized on a laptop, without a download.

Everything comes from params and offline knowledge: the toy's architecture is in params and its
prompts are tokenized exactly; a Hub model's architecture comes from transformer-lens's built-in
configs (Gemma, Llama: no fetch) or a config already in the local Hugging Face cache, with the Hub
forced offline; SAE widths come from params (trained) or the SAE id (`width_16k`). Prompt lengths
of Hub eval sets are an assumption (`tokens_per_prompt`), printed as such. Figures are estimates
of the dominant terms (weights, activations, KV cache, attention scores), not measurements.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

from .params import LOCAL_MODEL, TOY_MODEL, Params

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
F32 = 4
INDEX_BYTES_PER_TOKEN = 25  # token index: prompt_index, position, post_instruction (int64) + is_bos (uint8)
GENERATION_BYTES = 200  # one generations.jsonl row (ids, settings, completion)
HUB_TOKENS_PER_PROMPT = 48  # assumed prompt length (chat template included) when the set is not resolved
_WIDTH = re.compile(r"width_(\d+[km]?)", re.IGNORECASE)


@dataclass(frozen=True)
class Arch:
    """The dimensions the estimates need."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    d_vocab: int
    n_ctx: int
    gated_mlp: bool
    source: str

    @property
    def n_params(self) -> int:
        """Weights as transformer-lens holds them: embedding, blocks, and an untied unembedding."""
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp
        return 2 * self.d_vocab * self.d_model + self.n_layers * (attn + mlp)


@dataclass
class StagePlan:
    stage: str
    loads: list[str]
    computes: str
    disk_bytes: int
    memory_bytes: int
    notes: list[str] = field(default_factory=list)


def _hf_offline() -> None:
    """Make sure nothing below reaches the Hub (huggingface_hub may have read the env already)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - a dependency
        pass


def toy_arch(params: Params) -> Arch:
    from .toy.tokenizer import build_tokenizer

    t = params.model.toy
    return Arch(t.n_layers, t.d_model, t.d_mlp, t.n_heads, t.d_model // t.n_heads, t.n_heads,
                build_tokenizer().get_vocab_size(), t.n_ctx, False, "params (toy-refusal)")


def hub_arch(name: str) -> Arch | None:
    """transformer-lens's config for a Hub model, offline; None when it would need a download."""
    _hf_offline()
    from transformer_lens import loading_from_pretrained as loading

    try:
        c = loading.convert_hf_model_config(loading.get_official_model_name(name))
    except Exception:  # not built in and not in the local cache: unknown until a download
        return None
    n_heads = int(c["n_heads"])
    return Arch(int(c["n_layers"]), int(c["d_model"]), int(c["d_mlp"]), n_heads, int(c["d_head"]),
                int(c.get("n_key_value_heads") or n_heads), int(c["d_vocab"]), int(c["n_ctx"]),
                bool(c.get("gated_mlp", False)), "transformer-lens built-in config (offline)")


def local_arch(params: Params) -> Arch | None:
    """A local model's architecture from its file's config (GGUF metadata or config.json), offline; None
    when the file is not there (e.g. its package is not installed)."""
    from transformers import AutoConfig

    from . import local_model

    mp = params.model
    try:
        path = local_model.resolve_path(mp.path or "", Path.cwd())
        where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name} if path.is_file() \
            else {"pretrained_model_name_or_path": str(path)}
        c = local_model.hooked_config(AutoConfig.from_pretrained(**where, local_files_only=True), mp.n_ctx)
    except Exception:  # missing file or package, unreadable config: unknown until the `model` stage says why
        return None
    n_heads = int(c["n_heads"])
    return Arch(int(c["n_layers"]), int(c["d_model"]), int(c["d_mlp"]), n_heads, int(c["d_head"]),
                int(c["n_key_value_heads"] or n_heads), int(c["d_vocab"]), int(c["n_ctx"]), True,
                f"the local file's config ({path.name})")


def prompt_tokens(params: Params, tokens_per_prompt: int | None) -> tuple[dict[str, int], int, str]:
    """({split: prompt tokens}, longest prompt, how it was known)."""
    ev = params.eval
    per_split = {"selection": ev.n_selection, "eval": ev.n_eval}
    sets = ev.n_paraphrases + 1
    if params.model.name == TOY_MODEL and tokens_per_prompt is None:
        from .evalset import _resolve_toy
        from .toy import grammar
        from .toy.tokenizer import build_tokenizer

        tok = build_tokenizer()
        lengths: dict[str, int] = {}
        longest = 0
        for it in _resolve_toy(params).items:
            n = 1 + len(tok.encode(grammar.chat_prompt(it.text), add_special_tokens=False).ids)
            lengths[it.split] = lengths.get(it.split, 0) + n
            longest = max(longest, n)
        return lengths, longest, "exact (toy eval set tokenized)"
    t = tokens_per_prompt or HUB_TOKENS_PER_PROMPT
    return ({s: 2 * n * sets * t for s, n in per_split.items()}, t,
            f"assumed {t} tokens per prompt (set --tokens-per-prompt)")


def sae_width(params: Params, spec: dict[str, str], d_model: int) -> int | None:
    if spec["kind"] == "train":
        return d_model * params.saes.train.expansion_factor
    from sasgate.watch.layouts import gemma_scope_width  # the one width rule (65k is 2^16)

    m = _WIDTH.search(spec.get("sae_id") or spec.get("path") or spec.get("dir") or "")
    return gemma_scope_width(m[1]) if m else None


def _sae_bytes(d_model: int, width: int) -> int:
    return (2 * d_model * width + width + d_model) * F32  # W_enc, W_dec, b_enc, b_dec (float32)


def plan(params: Params, tokens_per_prompt: int | None = None) -> dict[str, Any]:
    """The plan of every stage in pipeline order, with totals; see the module docstring."""
    mp = params.model
    toy = mp.name == TOY_MODEL
    local = mp.name == LOCAL_MODEL
    arch = toy_arch(params) if toy else local_arch(params) if local else hub_arch(mp.name)
    warnings: list[str] = []
    if arch is None:
        warnings.append(f"{mp.name}: no architecture offline (not built into transformer-lens, not in the local "
                        "HF cache); model-sized figures are 0")
        arch = Arch(mp.depth, 0, 0, 1, 0, 1, 0, 0, False, "unknown offline")
    b = DTYPE_BYTES[mp.dtype] if not toy else F32
    weights = arch.n_params * b
    tokens, longest, how = prompt_tokens(params, tokens_per_prompt)
    n_tuples = len(params.tuples)
    ev = params.eval
    sets = ev.n_paraphrases + 1
    prompts = {"selection": 2 * ev.n_selection * sets, "eval": 2 * ev.n_eval * sets}
    n_post = 2 if toy else 5  # post-instruction tokens (toy: <eoi> <assistant>; Gemma template: 5)

    def forward_bytes(batch: int, seq: int) -> int:
        """Peak of one batched forward: residual + MLP hidden + attention scores of one layer, logits."""
        per_tok = (4 * arch.d_model + 2 * arch.d_mlp) * b
        return batch * seq * per_tok + batch * arch.n_heads * seq * seq * F32 + batch * arch.d_vocab * F32

    def kv_bytes(batch: int, seq: int) -> int:
        return 2 * arch.n_layers * batch * seq * arch.n_kv_heads * arch.d_head * b

    widths = {t.key: sae_width(params, t.sae_spec(), arch.d_model) for t in params.tuples}
    if any(w is None for w in widths.values()):
        warnings.append("SAE width unknown offline for " + ", ".join(k for k, w in widths.items() if w is None)
                        + " (counted as 0)")
    sae_bytes = {k: _sae_bytes(arch.d_model, w or 0) for k, w in widths.items()}
    all_sae = sum(sae_bytes.values())
    big_sae = max(sae_bytes.values())
    act_bytes = {s: n * arch.d_model * F32 for s, n in tokens.items()}
    cp, sp = params.collect, params.steer
    n_settings = 1 + 2 * len(sp.add_strengths) + 3 * len(sp.ablate_strengths)  # baseline, 5 arms (behaviour.ARMS)
    n_generations = n_settings * len(sp.seeds) * prompts["eval"]
    n_calibration = (n_settings - 1) * len(sp.seeds) * prompts["selection"] // 2 + len(sp.seeds) * prompts["selection"]
    gen_seq = longest + max(cp.max_new_tokens, sp.max_new_tokens)
    hub_weights = [] if toy or local else [f"{mp.name}@{mp.revision} ({_fmt(weights)} in {mp.dtype}; HF cache, first load)"]
    post_bytes = prompts["selection"] * arch.n_layers * n_post * arch.d_model * F32

    stages = [
        StagePlan("params", ["params.yaml"], "validate params", 1 << 10, 0),
        StagePlan("model", ["params.model"],
                  (f"train toy-refusal: {mp.toy.train_steps} steps x batch {mp.toy.batch_size}" if toy
                   else ("verify model.sha256, load with transformers, convert to transformer-lens"
                         + (f", LoRA {mp.finetune.steps} steps x batch {mp.finetune.batch_size}" if mp.finetune else "")
                         if local else "pin name + revision (no download)")),
                  weights if toy or local else 1 << 10,
                  weights * 4 + forward_bytes(mp.toy.batch_size, arch.n_ctx) if toy else 3 * weights if local else 0),
        StagePlan("collect", (hub_weights or [mp.name]) + ["eval set"],
                  f"forward {sum(prompts.values())} prompts ({sum(tokens.values())} tokens, {how}) in batches of "
                  f"{cp.batch_size}; capture {n_tuples} tuples; greedy baseline, {cp.max_new_tokens} new tokens",
                  n_tuples * sum(act_bytes.values()) + INDEX_BYTES_PER_TOKEN * sum(tokens.values()) + post_bytes
                  + GENERATION_BYTES * sum(prompts.values()),
                  weights + post_bytes + max(forward_bytes(cp.batch_size, longest), kv_bytes(cp.batch_size, gen_seq)
                                             + forward_bytes(cp.batch_size, 1))),
        StagePlan("directions", ["the model", "collect: selection post-instruction activations"],
                  f"DIM candidates at {arch.n_layers} layers x {n_post} positions, built on "
                  f"{params.directions.build_fraction:.0%} of the selection sources, scored on the rest",
                  arch.n_layers * n_post * arch.d_model * F32 * 2,
                  weights + post_bytes + forward_bytes(params.directions.batch_size, longest)),
        StagePlan("saes", [f"{t.key}: {t.sae}" for t in params.tuples],
                  ", ".join(f"{k}: d_sae {w}" for k, w in widths.items())
                  + (f"; train {params.saes.train.training_tokens} tokens each" if any(
                      t.sae == "train" for t in params.tuples) else "; fetch pinned SAEs"),
                  all_sae, (weights if toy else 0) + 4 * big_sae),
        StagePlan("features", ["saes", "collect: selection activations"],
                  f"mean SAE-latent difference, top {params.features.top_k} latents",
                  (params.features.top_k + arch.d_model) * F32 * n_tuples,
                  big_sae + act_bytes["selection"]),
        StagePlan("calibrate", ["the model", "the SAS tuple's SAE", "DIM", "SAS"],
                  f"{n_calibration} generations on the selection split (each arm on the class it is judged on), "
                  f"side effects of {n_settings} settings; choose one strength per arm",
                  GENERATION_BYTES * n_calibration,
                  weights + big_sae + kv_bytes(sp.batch_size, gen_seq) + forward_bytes(sp.batch_size, gen_seq)),
        StagePlan("steer", ["the model", "the SAS tuple's SAE", "DIM", "SAS", "calibrate: strengths"],
                  f"{n_generations} generations ({n_settings} settings x {len(sp.seeds)} seeds x "
                  f"{prompts['eval']} eval prompts), batches of {sp.batch_size}, {sp.max_new_tokens} new tokens",
                  GENERATION_BYTES * n_generations,
                  weights + big_sae + kv_bytes(sp.batch_size, gen_seq) + forward_bytes(sp.batch_size, gen_seq)),
        StagePlan("score", ["steer generations"], f"score {n_generations} completions ({params.score.version})",
                  GENERATION_BYTES * n_generations, GENERATION_BYTES * n_generations * 4),
        StagePlan("validity", ["scores", "scorer check set"], "behaviour gate (bootstrap CIs)", 1 << 16, 1 << 26),
        StagePlan("stability", ["scores"], "stability gate", 1 << 14, 1 << 26),
        StagePlan("reconstruction", ["the model", "saes", "collect: eval activations and prompts"],
                  f"nMSE of {n_tuples} SAEs on {tokens['eval']} eval tokens, {params.reconstruction.bootstrap_samples} "
                  f"bootstrap samples; spliced-in CE/KL: 5 forwards per tuple over {prompts['eval']} eval prompts "
                  f"in batches of {cp.batch_size}", 1 << 16,
                  weights + big_sae + act_bytes["eval"] * 3 + 2 * forward_bytes(cp.batch_size, longest)),
        StagePlan("remediation", ["reconstruction gate", "preregistration"],
                  "bounded search for alternative SAEs (only when reconstruction fails; "
                  + ("may query the Hub" if params.remediation.hub_access else "offline") + ")",
                  1 << 14, big_sae + act_bytes["eval"] * 3),
        StagePlan("decide", ["gate records"], "decision state machine, CLAIMS.md", 1 << 14, 0),
        StagePlan("report", ["decision.json", "gate records", "plots"], "report.html: every record and plot (SVG)",
                  1 << 20, 1 << 28),
    ]
    device = params.runtime.device
    if device != "cpu":
        import torch

        available = torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()
        if not available:
            warnings.append(f"runtime.device is {device!r}, which this machine does not have")
    peak = max(s.memory_bytes for s in stages)
    return {
        "model": mp.name, "dtype": "float32" if toy else mp.dtype, "device": device,
        "architecture": asdict(arch) | {"n_params": arch.n_params},
        "prompts": prompts, "prompt_tokens": tokens, "prompt_tokens_source": how,
        "downloads": hub_weights + [f"SAE {t.sae}" for t in params.tuples if t.sae_spec()["kind"] in ("sae_lens", "hf")]
        + ([f"eval set: {ev.harmful}", f"eval set: {ev.harmless}"] if ev.source == "custom" else []),
        "stages": [asdict(s) for s in stages],
        "total_disk_bytes": sum(s.disk_bytes for s in stages), "peak_memory_bytes": peak,
        "warnings": warnings,
    }


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_plan(p: dict[str, Any]) -> str:
    a = p["architecture"]
    lines = [f"model {p['model']} ({a['source']}): {a['n_params'] / 1e6:.1f} M params as transformer-lens holds "
             f"them (unembedding untied), {a['n_layers']} layers, "
             f"d_model {a['d_model']}, dtype {p['dtype']}, device {p['device']}",
             f"prompts {p['prompts']}, tokens {p['prompt_tokens']} ({p['prompt_tokens_source']})", ""]
    lines.append(f"{'stage':<15} {'disk':>10} {'memory':>10}  loads / computes")
    for s in p["stages"]:
        lines.append(f"{s['stage']:<15} {_fmt(s['disk_bytes']):>10} {_fmt(s['memory_bytes']):>10}  "
                     f"loads {', '.join(s['loads'])}")
        lines.append(f"{'':<37}  computes {s['computes']}")
    lines += ["", f"total disk (workspace; the DVC cache may hold a second copy): {_fmt(p['total_disk_bytes'])}",
              f"peak memory (largest stage, on {p['device']}; plus ~0.5 GiB of Python and torch): "
              f"{_fmt(p['peak_memory_bytes'])}"]
    lines.append("downloads at run time: " + ("; ".join(p["downloads"]) if p["downloads"] else "none"))
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)
