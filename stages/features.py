"""`features`: SAS steering vectors, one per required tuple, from the selection split only.

Per tuple: the tuple's SAE (through sae-lens) encodes the post-instruction activations of the
selection split's build part (the same prompts, after the same baseline filter, that DIM's
difference in means is built on: like for like); the mean latent activation over harmful tokens minus that over harmless tokens
ranks the latents; the top-k (positive difference) are kept, with their ids, means and
difference, and their decoded vector decode(diff on the kept latents) - decode(0) is the SAS
addition vector. The items are checked for selection/eval leakage first (LeakageError, exit 4).

`features.steer_tuple` picks the tuple `steer` uses: a tuple key, or `auto`, the required tuple
whose residual-stream position is nearest DIM's chosen layer (resid_pre of layer l sits at l,
resid_post of layer l at l + 1, other sites at l + 0.5; ties go to the tuple listed first).

Outputs: artifacts/features/ (features.json, vectors.safetensors), metrics/features.json,
manifests/features.json.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save_file

from sasgate import sae_io, sas
from sasgate.activations import load_acts, load_token_index, split_items
from sasgate.artifacts import atomic_dir, atomic_write_json, write_manifest
from sasgate.dim import load_direction
from sasgate.errors import ArtifactError, SelectionError
from sasgate.interventions import decoded_vector
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

SCHEMA = "sasgate.features/1"
TOKEN_SET = "selection split, build part (the prompts DIM is built on), post-instruction positions"


def steer_tuple(params: Params, dim_layer: int) -> tuple[str, str]:
    """(tuple key, why) of the tuple SAS steers at."""
    if params.features.steer_tuple != "auto":
        return params.features.steer_tuple, "set in params (features.steer_tuple)"
    t, dist = sas.nearest_tuple(list(params.tuples), dim_layer)
    return t.key, (f"auto: nearest required tuple to DIM's chosen layer (resid_pre of block {dim_layer}); "
                   f"{t.key} is {dist:g} block(s) away")


def run(params: Params, paths: Paths) -> dict[str, Any]:
    k = params.features.top_k
    items = split_items(paths, "selection")
    index = load_token_index(paths, "selection")
    if int(index["prompt_index"].max()) + 1 != len(items):
        raise ArtifactError(f"the selection token index covers {int(index['prompt_index'].max()) + 1} prompts but "
                            f"there are {len(items)} selection items; rerun `dvc repro collect`")
    _, dim_record = load_direction(paths.directions_dir)
    build_ids = set(dim_record["parts"]["build"]["items"])  # the prompts DIM's difference in means is built on
    in_build = torch.tensor([it.id in build_ids for it in items])
    post = (index["post_instruction"] != 0) & in_build[index["prompt_index"]]
    prompt = index["prompt_index"][post]
    harmful = torch.tensor([it.label == "harmful" for it in items])[prompt]
    chosen_key, why = steer_tuple(params, int(dim_record["chosen"]["layer"]))

    per_tuple: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    for tp in params.tuples:
        sae, source = sae_io.load_tuple_sae(paths, tp, device=params.runtime.device)
        acts = load_acts(paths, "selection", tp.key)[post]
        mean_h, mean_l = sas.latent_means(sae, acts, harmful)
        diff = mean_h - mean_l
        ids = sas.top_latents(diff, k)
        if tp.key == chosen_key and not ids:
            raise SelectionError(f"features: no latent of the {tp.key} SAE is more active on harmful than on "
                                 "harmless selection prompts; SAS has nothing to steer with")
        vector = decoded_vector(sae, ids, [float(diff[i]) for i in ids])
        tensors[f"{tp.key}.vector"] = vector.contiguous()
        tensors[f"{tp.key}.latents"] = torch.tensor(ids, dtype=torch.long)
        per_tuple.append({
            "tuple": tp.key, "hook_name": tp.hook_name, "sae": tp.sae, "d_sae": int(sae.cfg.d_sae),
            "sae_files": source.get("files", {}),
            "n_tokens": {"harmful": int(harmful.sum()), "harmless": int((~harmful).sum())},
            "latents": [{"id": i, "mean_harmful": float(mean_h[i]), "mean_harmless": float(mean_l[i]),
                         "diff": float(diff[i]), "rank": r} for r, i in enumerate(ids)],
            "n_positive_latents": int((diff > 0).sum()),
            "decoded_norm": float(vector.norm()),
        })
    record = {"schema": SCHEMA, "token_set": TOKEN_SET, "top_k": k,
              "rule": "top-k latents by mean activation difference (harmful - harmless), positive only",
              "steer_tuple": {"key": chosen_key, "why": why, "dim_layer": int(dim_record["chosen"]["layer"])},
              "tuples": per_tuple}
    with atomic_dir(paths.features_dir) as tmp:
        save_file(tensors, str(tmp / sas.VECTORS_FILE))
        atomic_write_json(tmp / sas.RECORD_FILE, record)
    metrics = {"steer_tuple": chosen_key,
               "per_tuple": {t["tuple"]: {"latents": [x["id"] for x in t["latents"]], "decoded_norm": t["decoded_norm"]}
                             for t in per_tuple}}
    atomic_write_json(paths.metrics("features"), metrics)
    write_manifest(paths.manifest("features"), "features", [paths.features_dir, paths.metrics("features")], paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("features", run)
