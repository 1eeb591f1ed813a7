"""Steering interventions as transformer-lens forward hooks: one module for every stage that steers.

`directions` scores DIM candidates with them, `steer` generates with them and measures their
side effects. Each builder returns a list of `(hook_name, fn)` pairs for `model.hooks(...)`,
`run_with_hooks(...)` or `ChatModel.generate(hooks=...)`. Every hook acts the same at every
position, so it behaves alike on a full prompt pass and on KV-cached single-token steps.

* `addition(hook, v, c)`: x <- x + c v at one hook. `directions` scores DIM candidates with the raw
  difference-in-means vector at `blocks.{l}.hook_resid_pre`, as Arditi et al. do; the steering arms
  add a unit direction (DIM's or SAS's) times s * resid_norm at the compared hook (sasgate.steering).
* `directional_ablation(model, r, c)`: x <- x - c (x . r^) r^ on every component that writes to
  the residual stream (resid_pre of every block, attn_out and mlp_out): with c = 1 the residual
  stream is orthogonal to r^ at every layer and position (Arditi et al.).
* `sae_latent_ablation(hook, sae, ids, c)`: x <- decode(f') + (x - decode(f)) with f = encode(x)
  and f' = f with the chosen latents scaled by (1 - c): the chosen latents are removed while the
  SAE's error term is kept, so an SAE that reconstructs badly does not damage the model by itself.
  Latent-level SAS: its own, reported arm, never compared with DIM's directional ablation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

Hook = tuple[str, Callable[..., Any]]


def resid_pre_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| in float32; a zero vector is an error (it names no direction)."""
    v = v.detach().to(torch.float32)
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("a direction must be a finite non-zero vector")
    return v / norm


def addition(hook_name: str, vector: torch.Tensor, coefficient: float) -> list[Hook]:
    """Add coefficient * vector to the activation at `hook_name`, at every position."""
    shift = (float(coefficient) * vector.detach().to(torch.float32)).contiguous()

    def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + shift.to(act.device, act.dtype)

    return [(hook_name, add)]


def ablation_hook_names(model: "HookedTransformer") -> list[str]:
    """Every hook that writes into the residual stream: resid_pre, attn_out, mlp_out of each block."""
    names = []
    for layer in range(int(model.cfg.n_layers)):
        for site in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"):
            name = f"blocks.{layer}.{site}"
            if name in model.hook_dict:
                names.append(name)
    return names


def directional_ablation(model: "HookedTransformer", direction: torch.Tensor, coefficient: float = 1.0) -> list[Hook]:
    """Project (a fraction `coefficient` of) the unit direction out of every residual-stream write."""
    r = unit(direction)
    c = float(coefficient)

    def ablate(act: torch.Tensor, hook: Any) -> torch.Tensor:
        rr = r.to(act.device, act.dtype)
        return act - c * (act @ rr).unsqueeze(-1) * rr

    return [(name, ablate) for name in ablation_hook_names(model)]


@torch.no_grad()
def decoded_vector(sae: "SAE", latent_ids: Sequence[int], values: Sequence[float]) -> torch.Tensor:
    """The residual-space vector of a sparse latent vector, through sae-lens: decode(f) - decode(0).

    Subtracting decode(0) drops the decoder bias, so what remains is sum_i f_i W_dec[i] (plus any
    output scaling the SAE applies), a direction to add rather than a reconstruction.
    """
    device = sae.W_dec.device
    f = torch.zeros(1, int(sae.cfg.d_sae), dtype=torch.float32, device=device)
    if len(latent_ids):
        f[0, torch.tensor(list(latent_ids), dtype=torch.long, device=device)] = torch.tensor(
            list(values), dtype=torch.float32, device=device)
    return (sae.decode(f) - sae.decode(torch.zeros_like(f)))[0].to("cpu", torch.float32)


def dense_latents(f: torch.Tensor) -> torch.Tensor:
    return f.to_dense() if f.is_sparse else f


def sae_latent_ablation(hook_name: str, sae: "SAE", latent_ids: Sequence[int], coefficient: float = 1.0) -> list[Hook]:
    """Scale the chosen SAE latents by (1 - coefficient) at `hook_name`, keeping the SAE error term."""
    ids = torch.tensor(list(latent_ids), dtype=torch.long)
    keep = 1.0 - float(coefficient)

    @torch.no_grad()
    def ablate(act: torch.Tensor, hook: Any) -> torch.Tensor:
        shape = act.shape
        x = act.reshape(-1, shape[-1]).to(sae.W_dec.device, torch.float32)
        f = dense_latents(sae.encode(x))
        error = x - sae.decode(f)
        f2 = f.clone()
        f2[:, ids.to(f2.device)] *= keep
        out = sae.decode(f2) + error
        return out.reshape(shape).to(act.device, act.dtype)

    return [(hook_name, ablate)]
