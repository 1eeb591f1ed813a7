"""SAS (sparse activation steering): the SAE latents that separate harmful from harmless prompts.

For one required tuple: encode the selection split's post-instruction activations with the
tuple's SAE (through sae-lens), take the mean latent activation over harmful and over harmless
prompt tokens, and keep the top-k latents by difference (harmful - harmless). Only latents with
a positive difference are kept: they are the ones that stand for "harmful", so adding their
decoded difference should induce refusal and zeroing them should bypass it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .artifacts import read_json
from .errors import ArtifactError
from .interventions import dense_latents


@torch.no_grad()
def latent_means(sae: Any, acts: torch.Tensor, harmful: torch.Tensor, batch_size: int = 4096
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean latent activation over harmful rows, over harmless rows), float64 [d_sae] each."""
    harmful = harmful.bool()
    if acts.shape[0] != harmful.shape[0]:
        raise ValueError(f"{acts.shape[0]} activation rows but {harmful.shape[0]} labels")
    if not harmful.any() or harmful.all():
        raise ValueError("latent means need tokens of both classes")
    d_sae = int(sae.cfg.d_sae)
    sums = {True: torch.zeros(d_sae, dtype=torch.float64), False: torch.zeros(d_sae, dtype=torch.float64)}
    device = sae.W_dec.device
    was_training = sae.training
    sae.eval()
    try:
        for start in range(0, acts.shape[0], batch_size):
            f = dense_latents(sae.encode(acts[start:start + batch_size].to(device, torch.float32))).to("cpu", torch.float64)
            h = harmful[start:start + batch_size]
            sums[True] += f[h].sum(dim=0)
            sums[False] += f[~h].sum(dim=0)
    finally:
        sae.train(was_training)
    n_h = int(harmful.sum())
    return sums[True] / n_h, sums[False] / (harmful.numel() - n_h)


def top_latents(diff: torch.Tensor, k: int) -> list[int]:
    """Ids of the k largest positive entries of `diff` (ties: lower id first), largest first."""
    order = sorted(range(diff.numel()), key=lambda i: (-float(diff[i]), i))
    return [i for i in order[:k] if float(diff[i]) > 0]


def residual_index(site: str, layer: int) -> float:
    """Where a hook reads the residual stream, in units of blocks: resid_pre of block l is l, its
    resid_post is l + 1 (= resid_pre of block l + 1); mid-block sites are l + 0.5."""
    return {"resid_pre": float(layer), "resid_post": layer + 1.0}.get(site, layer + 0.5)


def nearest_tuple(tuples: list[Any], dim_layer: int) -> tuple[Any, float]:
    """The required tuple whose residual position is nearest DIM's layer (resid_pre of `dim_layer`);
    ties go to the tuple listed first in params. Returns (tuple, distance in blocks)."""
    best = min(range(len(tuples)), key=lambda i: (abs(residual_index(tuples[i].site, tuples[i].layer) - dim_layer), i))
    t = tuples[best]
    return t, abs(residual_index(t.site, t.layer) - dim_layer)


# --------------------------------------------------------------------------- the `features` artifact

RECORD_FILE = "features.json"
VECTORS_FILE = "vectors.safetensors"


def load_steering(features_dir: Path) -> tuple[str, torch.Tensor, list[int], dict[str, Any]]:
    """(steer tuple key, its decoded SAS vector, its latent ids, the features record) that `features` wrote."""
    from safetensors.torch import load_file

    record = read_json(features_dir / RECORD_FILE)
    key = record["steer_tuple"]["key"]
    try:
        tensors = load_file(str(features_dir / VECTORS_FILE))
        vector, latents = tensors[f"{key}.vector"], tensors[f"{key}.latents"]
    except Exception as exc:
        raise ArtifactError(f"missing or corrupt {features_dir / VECTORS_FILE} (run `dvc repro features`): "
                            f"{exc}") from None
    return key, vector, [int(i) for i in latents.tolist()], record
