"""The one way every stage loads and runs the model: the toy and Hub models share this code path.

`load_chat_model(params, paths)` gives a `ChatModel`: a transformer-lens
`HookedTransformer` plus its chat template. `encode` builds BOS + chat-template
prompts, LEFT-padded, so the last `n_post_instruction` positions of every row are
the post-instruction tokens (Arditi et al.). `generate` runs batched generation
with a KV cache and an explicit attention mask, so positions of padded rows are
offset correctly and a batch gives the same greedy completions as each prompt
alone.

Hooks passed to `generate` are transformer-lens `(hook_name, fn)` pairs. They see
the prompt pass first (activations `[B, T, ...]`, pad positions included: pads
are masked out of attention, so what a hook writes there is never read) and then
one pass per new token (`[B, 1, ...]`). A hook that acts the same at every
position therefore behaves as it would on full re-runs of the sequence.

Weights are read only from safetensors; Hub models are loaded by
transformer-lens (`from_pretrained_no_processing`: the residual stream is left
as the Hub model computes it, which is what Hub SAEs such as Gemma Scope were
trained on).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig, TransformerLensKeyValueCache

from .errors import ArtifactError, DataError, ParamsError
from .params import LOCAL_MODEL, TOY_MODEL, ModelParams, Params
from .paths import Paths

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_DIR = "tokenizer"  # a local model's HF tokenizer (save_pretrained)
PIN_FILE = "pin.json"
PIN_SCHEMA = "sasgate.model_pin/1"
INSTRUCTION = "{instruction}"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Hook = tuple[str, Callable[..., Any]]
# transformer-lens 3 deprecates HookedTransformer in favour of TransformerBridge; sasgate pins
# transformer-lens and uses HookedTransformer on purpose (hook names sae-lens and Hub SAEs expect).
_DEPRECATION = r"HookedTransformer(\.from_pretrained)? is deprecated"


def new_hooked_transformer(cfg: HookedTransformerConfig, **kwargs: Any) -> HookedTransformer:
    """HookedTransformer(cfg, ...) without transformer-lens 3's deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
        return HookedTransformer(cfg, **kwargs)


# Weights transformer-lens feeds to F.linear as `W.T.contiguous()` (MLP, unembed) or rearranges to
# "(head d_head) d_model" (Q/K/V): stored in that layout, the copy on every forward is a no-op.
_T_LAST2 = ("W_gate", "W_in", "W_out", "W_U")
_T_HEADS = ("W_Q", "W_K", "W_V", "_W_K", "_W_V")


def linear_layout(model: HookedTransformer) -> HookedTransformer:
    """Lay weights out the way transformer-lens's forward reads them, so it stops copying them per call.

    Values do not change, only strides: F.linear sees the same contiguous matrices as before, so logits are
    bit-identical (tests/test_local_model.py); KV-cached decoding of SmolLM2-135M runs about 2x faster."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _T_LAST2:
                p.data = p.data.t().contiguous().t()
            elif leaf in _T_HEADS and p.dim() == 3:
                p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)
    return model


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template family: the user turn up to where the assistant answers, and its stop tokens."""

    text: str  # holds INSTRUCTION once; ends where the assistant's answer starts
    stop_tokens: tuple[str, ...] = ()

    @property
    def suffix(self) -> str:
        return self.text.split(INSTRUCTION, 1)[1]


# The families `model.chat_template` may name (no system prompt, as in Arditi et al.).
CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "gemma": ChatTemplate("<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n", ("<end_of_turn>",)),
    "chatml": ChatTemplate(
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n", ("<|im_end|>", "<|endoftext|>")
    ),
    "llama3": ChatTemplate(
        "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>",),
    ),
    "llama2": ChatTemplate("[INST] {instruction} [/INST] "),
}
CHAT_TEMPLATES["qwen"] = CHAT_TEMPLATES["chatml"]


class _Codec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class _ToyCodec:
    """The toy's word-level `tokenizers.Tokenizer`."""

    def __init__(self, tok: Any):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


class _HubCodec:
    """A Hugging Face tokenizer; decoding leaves spacing as the model wrote it."""

    def __init__(self, tok: Any):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


@dataclass
class ChatModel:
    """A HookedTransformer with its chat template: what every stage uses to encode and generate."""

    model: HookedTransformer = field(repr=False)
    name: str
    n_post_instruction: int  # trailing prompt tokens after the instruction (toy: <eoi>, <assistant>)
    template: str = field(repr=False)  # holds "{instruction}"; ends where the assistant answers
    codec: _Codec = field(repr=False)
    bos_id: int | None = field(repr=False)
    pad_id: int = field(repr=False)
    stop_ids: tuple[int, ...] = field(repr=False)
    refusal_fn: Callable[[str], bool] | None = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)  # the underlying tokenizer (tokenizers.Tokenizer or HF)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_ctx(self) -> int:
        return int(self.model.cfg.n_ctx)

    def prompt(self, instruction: str) -> str:
        """The chat-template text of one instruction (without BOS)."""
        return self.template.replace(INSTRUCTION, instruction)

    def prompt_ids(self, instruction: str) -> list[int]:
        """BOS (when the tokenizer has one) + the chat-template tokens of one instruction."""
        ids = self.codec.encode(self.prompt(instruction))
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def encode(self, instructions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, T] long, attention_mask [B, T] bool), LEFT-padded, on the model's device."""
        if isinstance(instructions, str):
            raise TypeError("encode takes a list of instructions, not one string")
        rows = [self.prompt_ids(text) for text in instructions]
        if not rows:
            raise ValueError("encode needs at least one instruction")
        width = max(len(r) for r in rows)
        if width > self.n_ctx:
            raise DataError(f"a prompt has {width} tokens, more than the context of {self.name} ({self.n_ctx})")
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = True
        return ids.to(self.device), mask.to(self.device)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped."""
        return self.codec.decode([int(i) for i in ids])

    @torch.no_grad()
    def generate(
        self,
        instructions: Sequence[str],
        max_new_tokens: int,
        hooks: Sequence[Hook] = (),
        do_sample: bool = False,
        seed: int | None = None,
        temperature: float = 1.0,
    ) -> list[str]:
        """Completions of each instruction's chat prompt (batched, left-padded, KV-cached).

        Greedy unless `do_sample`; sampling draws from a `torch.Generator` seeded with `seed`.
        A row stops at its first stop token (EOS, end of turn); generation also stops where
        the longest prompt would run past the model's context. Returns the decoded
        completions without special tokens.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}")
        ids, mask = self.encode(instructions)
        batch = ids.shape[0]
        steps = min(max_new_tokens, self.n_ctx - int(mask.sum(dim=1).max()))
        if steps < 1:
            return [""] * batch
        device = self.device
        gen = None
        if do_sample:
            gen = torch.Generator(device=device)
            gen.manual_seed(0 if seed is None else int(seed))
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        out = torch.full((batch, steps), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, device, batch)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.hooks(fwd_hooks=list(hooks)):
                logits = self.model(ids, attention_mask=mask.long(), past_kv_cache=cache, return_type="logits")
                for step in range(steps):
                    last = logits[:, -1, :].float()
                    if do_sample:
                        probs = torch.softmax(last / temperature, dim=-1)
                        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                    else:
                        nxt = last.argmax(dim=-1)
                    nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
                    out[:, step] = nxt
                    finished |= torch.isin(nxt, stop)
                    if bool(finished.all()) or step == steps - 1:
                        break
                    logits = self.model(
                        nxt[:, None],
                        attention_mask=torch.ones((batch, 1), dtype=torch.long, device=device),
                        past_kv_cache=cache,
                        return_type="logits",
                    )
        finally:
            self.model.train(was_training)
        completions = []
        stops = set(self.stop_ids)
        for row in out.tolist():
            kept = []
            for t in row:
                if t in stops:
                    break
                kept.append(t)
            completions.append(self.decode(kept))
        return completions

    def is_refusal(self, completion: str) -> bool:
        """The toy's own refusal test; Hub models leave refusal to the versioned scorer."""
        if self.refusal_fn is None:
            raise NotImplementedError(f"{self.name} has no built-in refusal test; score completions with the scorer")
        return self.refusal_fn(completion)


# --------------------------------------------------------------------------- toy


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"missing model config {path} (run the `model` stage: `dvc repro model`)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        arch = cfg["hooked_transformer_config"]
        tokcfg = cfg["tokenizer"]
        _ = cfg["n_post_instruction"], tokcfg["chat_template"], tokcfg["bos_token"], tokcfg["eos_token"]
        _ = tokcfg["pad_token"]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"corrupt model config {path}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"corrupt model config {path}: missing field {exc}") from None
    if not isinstance(arch, dict):
        raise ArtifactError(f"corrupt model config {path}: hooked_transformer_config is not a mapping")
    return cfg


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ArtifactError(f"missing model weights {path} (run the `model` stage: `dvc repro model`)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on a bad header or truncation
        raise ArtifactError(f"corrupt model weights {path}: {exc}") from None


def toy_model_from_dir(model_dir: str | Path, device: str = "cpu", dtype: str = "float32") -> ChatModel:
    """Load `toy-refusal` from a folder holding model.safetensors, config.json and tokenizer.json.

    The toy is trained in float32; `dtype` (bfloat16, float16) casts the weights as they load."""
    from .toy import grammar
    from .toy.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"missing model folder {model_dir} (run the `model` stage: `dvc repro model`)")
    cfg = _read_config(model_dir)
    tok = load_tokenizer(model_dir / TOKENIZER_FILE)
    state = _load_weights(model_dir / WEIGHTS_FILE)
    try:
        hooked_cfg = HookedTransformerConfig(
            **cfg["hooked_transformer_config"], device=device, dtype=DTYPES[dtype], seed=None, init_weights=False
        )
    except Exception as exc:
        raise ArtifactError(f"corrupt model config {model_dir / CONFIG_FILE}: {exc}") from None
    if hooked_cfg.d_vocab != tok.get_vocab_size():
        raise ArtifactError(
            f"{model_dir}: config.json says d_vocab = {hooked_cfg.d_vocab} but tokenizer.json has "
            f"{tok.get_vocab_size()} tokens"
        )
    model = new_hooked_transformer(hooked_cfg, move_to_device=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"model weights {model_dir / WEIGHTS_FILE} do not fit config.json: {exc}") from None
    model.eval()
    tc = cfg["tokenizer"]
    ids = {name: tok.token_to_id(tc[name]) for name in ("bos_token", "eos_token", "pad_token")}
    if None in ids.values():
        raise ArtifactError(f"{model_dir}: tokenizer.json lacks a special token named in config.json: {tc}")
    template = tc["chat_template"]
    if template.count(INSTRUCTION) != 1:
        raise ArtifactError(f"{model_dir}: config.json chat_template must hold {INSTRUCTION} once")
    return ChatModel(
        model=model,
        name=cfg.get("name", TOY_MODEL),
        n_post_instruction=int(cfg["n_post_instruction"]),
        template=template,
        codec=_ToyCodec(tok),
        bos_id=ids["bos_token"],
        pad_id=ids["pad_token"],
        stop_ids=(ids["eos_token"],),
        refusal_fn=grammar.is_refusal,
        tokenizer=tok,
    )


def _check_toy_matches_params(cm: ChatModel, params: Params, model_dir: Path) -> None:
    toy = params.model.toy
    cfg = cm.model.cfg
    want = {"n_layers": toy.n_layers, "d_model": toy.d_model, "n_heads": toy.n_heads, "d_mlp": toy.d_mlp,
            "n_ctx": toy.n_ctx}
    diff = {k: (getattr(cfg, k), v) for k, v in want.items() if getattr(cfg, k) != v}
    if diff:
        desc = ", ".join(f"{k}: model {a} vs params {b}" for k, (a, b) in sorted(diff.items()))
        raise ArtifactError(f"{model_dir} was built with other params ({desc}); rerun the `model` stage")


# --------------------------------------------------------------------------- local


def local_model_from_dir(model_dir: str | Path, device: str = "cpu", dtype: str = "float32") -> ChatModel:
    """Load a converted local model (sasgate.local_model) from the `model` stage's folder: model.safetensors
    (HookedTransformer weights), config.json (architecture, chat template, token ids, source pin) and
    tokenizer/ (the HF tokenizer)."""
    from transformers import AutoTokenizer

    from . import local_model

    model_dir = Path(model_dir)
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"missing model config {path} (run the `model` stage: `dvc repro model`)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        arch, tc = cfg["hooked_transformer_config"], cfg["tokenizer"]
        template, stop_ids, pad_id = tc["chat_template"], tuple(tc["stop_ids"]), int(tc["pad_id"])
        bos_id, n_post = tc["bos_id"], int(cfg["n_post_instruction"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"corrupt model config {path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"corrupt model config {path}: missing or bad field {exc}") from None
    if template.count(INSTRUCTION) != 1:
        raise ArtifactError(f"{path}: chat_template must hold {INSTRUCTION} once")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir / TOKENIZER_DIR), local_files_only=True)
    except Exception as exc:
        raise ArtifactError(f"missing or corrupt tokenizer in {model_dir / TOKENIZER_DIR}: {exc}") from None
    model = local_model.hooked_from_config(arch, device, DTYPES[dtype])
    if model.cfg.d_vocab < len(tok):
        raise ArtifactError(f"{path}: d_vocab = {model.cfg.d_vocab} but the tokenizer has {len(tok)} tokens")
    local_model.load_weights(model, _load_weights(model_dir / WEIGHTS_FILE), model_dir / WEIGHTS_FILE)
    linear_layout(model)
    return local_chat(model, tok, template, bos_id, stop_ids, pad_id, n_post, cfg.get("name", LOCAL_MODEL))


def local_chat(model: HookedTransformer, tok: Any, template: str, bos_id: int | None, stop_ids: Sequence[int],
               pad_id: int, n_post_instruction: int | None = None, name: str = LOCAL_MODEL) -> ChatModel:
    """A ChatModel over a converted local model and its HF tokenizer; n_post_instruction defaults to the
    template's suffix length in tokens."""
    codec = _HubCodec(tok)
    n_post = len(codec.encode(template.split(INSTRUCTION, 1)[1])) if n_post_instruction is None else n_post_instruction
    model.eval()
    return ChatModel(model=model, name=name, n_post_instruction=n_post, template=template, codec=codec,
                     bos_id=None if bos_id is None else int(bos_id), pad_id=int(pad_id),
                     stop_ids=tuple(int(i) for i in stop_ids), refusal_fn=None, tokenizer=tok)


def _check_local_matches_params(cm: ChatModel, params: Params, model_dir: Path) -> None:
    """The converted folder must come from the file params pin, with the finetune params asked for now."""
    from . import local_model

    cfg = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    src = local_model.read_source(cfg, model_dir / CONFIG_FILE)
    mp = params.model
    want_ft = mp.finetune.model_dump(mode="json") if mp.finetune is not None else None
    if src["sha256"] != mp.sha256:
        raise ArtifactError(f"{model_dir} was converted from a file with sha256 {src['sha256']}, but model.sha256 "
                            f"pins {mp.sha256}; rerun the `model` stage")
    if cfg.get("finetune") != want_ft or cm.model.cfg.n_layers != mp.n_layers:
        raise ArtifactError(f"{model_dir} was built with other model params (finetune or n_layers); rerun the "
                            "`model` stage")


# --------------------------------------------------------------------------- hub


def chat_template_family(name: str) -> ChatTemplate:
    try:
        return CHAT_TEMPLATES[name.lower()]
    except KeyError:
        raise ParamsError(
            f"model.chat_template = {name!r} is not a known template family; known: {sorted(CHAT_TEMPLATES)}"
        ) from None


def hub_pin(mp: ModelParams) -> dict[str, Any]:
    """pin.json for a Hub model: what the `model` stage records instead of weights."""
    return {
        "schema": PIN_SCHEMA,
        "name": mp.name,
        "revision": mp.revision,
        "chat_template": mp.chat_template,
        "dtype": mp.dtype,
        "n_layers": mp.n_layers,
    }


def _check_pin(mp: ModelParams, model_dir: Path) -> None:
    path = model_dir / PIN_FILE
    if not path.is_file():
        return
    try:
        pin = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"corrupt pin file {path}: {exc}") from None
    want = hub_pin(mp)
    if pin != want:
        raise ArtifactError(f"{path} pins {pin.get('name')}@{pin.get('revision')}, but params name "
                            f"{mp.name}@{mp.revision}; rerun the `model` stage")


def load_hub_model(mp: ModelParams, device: str = "cpu") -> ChatModel:
    """A Hub model through transformer-lens, pinned to `mp.revision`; errors name the model and the cause."""
    from transformer_lens import loading_from_pretrained as loading

    if mp.name == TOY_MODEL or mp.revision is None or mp.n_layers is None or mp.chat_template is None:
        raise ParamsError(f"{mp.name!r} is not a pinned Hub model (needs revision, n_layers, chat_template)")
    family = chat_template_family(mp.chat_template)
    try:
        official = loading.get_official_model_name(mp.name)
    except ValueError:
        raise ParamsError(f"model.name {mp.name!r} is not a model transformer-lens can load") from None
    where = f"{mp.name}@{mp.revision}"
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(official, revision=mp.revision)
        tl_tok = copy.deepcopy(tok)
        # transformer-lens may re-load the tokenizer from init_kwargs (to add BOS): keep it on the pin
        tl_tok.init_kwargs["revision"] = mp.revision
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
            model = HookedTransformer.from_pretrained_no_processing(
                official,
                revision=mp.revision,
                dtype=DTYPES[mp.dtype],
                device=device,
                tokenizer=tl_tok,
                default_padding_side="left",
            )
    except Exception as exc:  # hub, network, cache and conversion errors all become one message
        raise ArtifactError(
            f"cannot load Hub model {where}: {type(exc).__name__}: {str(exc).rstrip('. ')}. Is it in the local Hugging Face cache "
            "(HF_HUB_OFFLINE=1 allows no download), and is the revision right?"
        ) from exc
    if model.cfg.n_layers != mp.n_layers:
        raise ParamsError(f"model.n_layers = {mp.n_layers}, but {where} has {model.cfg.n_layers} layers")
    model.eval()
    codec = _HubCodec(tok)
    stop_ids = []
    for t in (tok.eos_token, *family.stop_tokens):
        if t is None:
            continue
        i = tok.convert_tokens_to_ids(t)
        if i is not None and i != tok.unk_token_id and i not in stop_ids:
            stop_ids.append(int(i))
    if not stop_ids:
        raise ArtifactError(f"{where}: its tokenizer has no EOS or end-of-turn token to stop generation at")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    return ChatModel(
        model=model,
        name=mp.name,
        n_post_instruction=len(codec.encode(family.suffix)),
        template=family.text,
        codec=codec,
        bos_id=tok.bos_token_id,
        pad_id=int(pad_id),
        stop_ids=tuple(stop_ids),
        refusal_fn=None,
        tokenizer=tok,
    )


# --------------------------------------------------------------------------- entry


def load_chat_model(params: Params, paths: Paths) -> ChatModel:
    """The model of the current params: toy-refusal or a converted local model from artifacts/model, a Hub
    model by its pin."""
    device = params.runtime.device
    if params.model.name == LOCAL_MODEL:
        cm = local_model_from_dir(paths.model_dir, device=device, dtype=params.model.dtype)
        _check_local_matches_params(cm, params, paths.model_dir)
        return cm
    if params.model.name == TOY_MODEL:
        cm = toy_model_from_dir(paths.model_dir, device=device, dtype=params.model.dtype)
        _check_toy_matches_params(cm, params, paths.model_dir)
        return cm
    _check_pin(params.model, paths.model_dir)
    return load_hub_model(params.model, device=device)

