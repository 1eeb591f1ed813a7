"""`saes`: one SAE per required tuple, in sae-lens disk format, under artifacts/saes/<tuple_key>/.

Tuples whose `sae` is `train` get an SAE trained here with sae-lens (toy-refusal only: the
corpus is the toy grammar's train pairs); the others are fetched from the Hub at a pinned
commit or read from a local folder (see sasgate.sae_io). Every SAE is checked against its
tuple (d_in = the model's d_model, hook name) and saved with a source.json recording where it
came from and the sha256 of every source file.

Outputs (byte-identical across runs): artifacts/saes/ (one atomic rename), metrics/saes.json,
manifests/saes.json. Timings go to stderr and logs/runs.jsonl only.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from sasgate import sae_io
from sasgate.artifacts import atomic_dir, atomic_write_json, write_manifest
from sasgate.artifacts import sha256_bytes
from sasgate.params import LOCAL_MODEL, Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

METRICS_SCHEMA = "sasgate.metrics.saes/1"


def _say(msg: str) -> None:
    print(f"sasgate saes: {msg}", file=sys.stderr, flush=True)


def run(params: Params, paths: Paths) -> dict[str, Any]:
    device = params.runtime.device
    tp_train = [t for t in params.tuples if t.sae_spec()["kind"] == "train"]
    d_model = sae_io.model_d_model(params, paths)
    train_acts: dict[str, Any] = {}
    corpus_info: dict[str, Any] | None = None
    chat = None
    if tp_train:
        from sasgate.modeling import load_chat_model

        chat = load_chat_model(params, paths)  # checks the model folder against params
        d_model = int(chat.model.cfg.d_model)
        t0 = time.perf_counter()
        local = params.model.name == LOCAL_MODEL
        texts = sae_io.local_training_corpus(params, chat) if local else sae_io.training_corpus(params)
        if local:
            _say(f"wrote {len(texts)} corpus sequences (the model's own answers) in {time.perf_counter() - t0:.1f}s")
            t0 = time.perf_counter()
        train_acts = sae_io.collect_training_activations(chat, texts, [t.hook_name for t in tp_train])
        n_tok = next(iter(train_acts.values())).shape[0]
        _say(f"collected {n_tok} training tokens x {len(tp_train)} hooks in {time.perf_counter() - t0:.1f}s")
        dataset = sae_io.LOCAL_CORPUS_DATASET if local else sae_io.CORPUS_DATASET
        corpus_info = {"dataset": dataset, "sequences": len(texts), "tokens": n_tok,
                       "excluded_positions": ["BOS", "pad"],
                       "sha256": sha256_bytes("\n".join(texts).encode("utf-8")),
                       "pairs": ("synthetic instructions (sasgate/instructions.py, checked disjoint from the locked "
                                 "eval set) in the chat template + the model's own greedy answers") if local else
                       "toy grammar train split (disjoint from eval/selection/validation)"}

    per_tuple: dict[str, Any] = {}
    with atomic_dir(paths.saes_dir) as tmp:
        for tp in params.tuples:
            out = tmp / tp.key
            t0 = time.perf_counter()
            if tp.sae_spec()["kind"] == "train":
                acts = train_acts[tp.hook_name]
                res = sae_io.train_sae(acts, params.saes.train, tp.hook_name, params.model.name, device=device,
                                       context_size=int(chat.model.cfg.n_ctx) if chat is not None else None,
                                       dataset=corpus_info["dataset"] if corpus_info else sae_io.CORPUS_DATASET)
                files = sae_io.save_sae(res.sae, out)
                sae = sae_io.load_sae_dir(out, device=device)  # what later stages will load
                stats = sae_io.sae_stats(sae, acts)
                training = {"params": params.saes.train.model_dump(mode="json"), "corpus": corpus_info,
                            "trainer": "sae_lens.SAETrainer", "steps": res.steps, "tokens_seen": res.tokens_seen,
                            "lr_schedule": {"name": "constant", "decay_fraction": sae_io.LR_DECAY_FRACTION},
                            "normalize_activations": "expected_average_only_in (folded into the weights)"}
                origin: dict[str, Any] = {"source_files": {}}
                metrics = {"final_loss": res.final_loss, "final_mse_loss": res.final_mse_loss,
                           "train_nmse": stats["nmse"], "l0": stats["l0"], "dead_latents": stats["dead_latents"],
                           "steps": res.steps, "tokens_seen": res.tokens_seen,
                           "loss_curve_every_50_steps": sae_io.stats_for_log(res.losses)}
                _say(f"{tp.key}: trained {res.steps} steps in {time.perf_counter() - t0:.1f}s, "
                     f"train nMSE {stats['nmse']:.4f}, L0 {stats['l0']:.2f}")
            else:
                sae, origin = sae_io.fetch_for_tuple(params, paths, tp, device=device)
                training = None
                files = {}
                metrics = {"l0": sae.cfg.metadata.l0 if isinstance(sae.cfg.metadata.l0, (int, float)) else None}
            checks = sae_io.check_sae_fits(sae, tp, d_model, params.model.name)
            if not files:
                files = sae_io.save_sae(sae, out)
            record = sae_io.source_record(params, tp, sae, origin, files, checks, training)
            sae_io.write_source(out, record)
            per_tuple[tp.key] = {"kind": record["kind"], "architecture": record["sae"]["architecture"],
                                 "d_in": record["sae"]["d_in"], "d_sae": record["sae"]["d_sae"],
                                 "hook_match": checks["hook_match"], **metrics}
    result = {"schema": METRICS_SCHEMA, "model": params.model.name, "tuples": per_tuple}
    atomic_write_json(paths.metrics("saes"), result)
    write_manifest(paths.manifest("saes"), "saes", [paths.saes_dir, paths.metrics("saes")], paths.root)
    return result


if __name__ == "__main__":
    stage_main("saes", run)
