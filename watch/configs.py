"""What an SAE's own config file declares: model, hook, width, architecture, L0.

Three declared formats: sae-lens `cfg.json` (sae-lens 6 keeps model and hook under `metadata`,
older releases at the top level), EleutherAI sparsify `cfg.json` (no hook: the folder name
`layers.N` is the output of layer N; no model: the repo declares it), and Llama Scope
`hyperparams.json` (`hook_point_in`). A config missing what coverage needs raises ValueError
with the reason, which the caller records as a skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .descriptors import parse_hook

_SPARSIFY_DIR = re.compile(r"^(?:layers\.(\d+)(\.mlp)?|layer_(\d+))$")


@dataclass(frozen=True)
class Declared:
    model: str | None
    hook_name: str
    layer: int
    site: str
    width: int | None
    architecture: str | None
    l0: float | None


def _hooked(model: str | None, hook: Any, **rest: Any) -> Declared:
    if not isinstance(hook, str):
        raise ValueError("declares no hook name")
    layer, site = parse_hook(hook)
    if layer is None or site is None:
        raise ValueError(f"hook {hook!r} is not a block hook sasgate matches (resid/mlp/attn of one layer)")
    return Declared(model=model, hook_name=hook, layer=layer, site=site, **rest)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def sae_lens_cfg(cfg: dict[str, Any]) -> Declared:
    """sae-lens cfg.json, both the 6.x shape (`metadata.model_name`) and the older flat one."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    model = meta.get("model_name") or cfg.get("model_name")
    if not isinstance(model, str) or not model:
        raise ValueError("cfg.json declares no model_name")
    arch = cfg.get("architecture") or meta.get("training_architecture")
    return _hooked(model, meta.get("hook_name") or cfg.get("hook_name"), width=_int(cfg.get("d_sae")),
                   architecture=arch if isinstance(arch, str) else None, l0=_float(meta.get("l0") or cfg.get("l0")))


def sparsify_cfg(folder: str, cfg: dict[str, Any], model: str | None) -> Declared:
    """sparsify cfg.json in `layers.N/` (residual stream out of layer N), `layers.N.mlp/` or older `layer_N/`."""
    m = _SPARSIFY_DIR.match(folder.rsplit("/", 1)[-1])
    if not m:
        raise ValueError(f"folder {folder!r} is not sparsify's layers.N or layer_N")
    layer = int(m[1] or m[3])
    hook = f"blocks.{layer}.hook_mlp_out" if m[2] else f"blocks.{layer}.hook_resid_post"
    d_in, factor = _int(cfg.get("d_in")), _int(cfg.get("expansion_factor"))
    width = _int(cfg.get("num_latents")) or (d_in * factor if d_in and factor else None)
    return _hooked(model, hook, width=width, architecture="topk" if _int(cfg.get("k")) else None,
                   l0=_float(cfg.get("k")))


def llama_scope_cfg(cfg: dict[str, Any], model: str | None) -> Declared:
    """Llama Scope hyperparams.json: `hook_point_in`, `d_sae`, `top_k`; the model from the repo when absent."""
    declared = cfg.get("model_name")
    return _hooked(declared if isinstance(declared, str) else model, cfg.get("hook_point_in"),
                   width=_int(cfg.get("d_sae")), architecture="topk" if _int(cfg.get("top_k")) else cfg.get("act_fn"),
                   l0=_float(cfg.get("top_k")))
