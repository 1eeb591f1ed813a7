"""Benchmark (not a test): `sasgate watch` over an imitation Hub of 5,000 repos.

Serves REPOS repos from tests/hubsim.py (a fifth of them sae-lens SAE releases with two SAEs
each, the rest plain model repos; listing pages of 1,000 like the Hub's), then runs the real
CLI (real huggingface_hub client, HF_ENDPOINT) three times on one state file: the first poll
(reads every repo), a poll with nothing changed, and a poll after CHANGED repos got a new sha.
Prints the wall time and the requests per kind of each poll.

    python benchmarks/bench_watch.py [--repos 5000] [--changed 10]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hubsim import HubSim, hub_env, watch_command  # noqa: E402

AUTHORS = ["google", "EleutherAI", "jbloom", "fnlp", "canrager"]


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _repo(i: int, version: int = 1) -> dict:
    author = AUTHORS[i % len(AUTHORS)]
    stamp = f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}T00:00:00.000Z"
    if i % 5:
        return {"id": f"{author}/model-{i}", "sha": _sha(f"{i}@{version}"), "lastModified": stamp,
                "tags": ["transformers"], "files": {"config.json": {"json": {"i": i}}, "model.safetensors": {"bytes": 8}}}
    files = {}
    for layer in (i % 4, (i + 1) % 4):
        hook = f"blocks.{layer}.hook_resid_post"
        files[f"{hook}/cfg.json"] = {"json": {"architecture": "topk", "d_sae": 256, "metadata": {
            "model_name": "toy-refusal", "hook_name": hook}}}
        files[f"{hook}/sae_weights.safetensors"] = {"bytes": 8}
    return {"id": f"{author}/saes-{i}", "sha": _sha(f"{i}@{version}"), "lastModified": stamp,
            "tags": ["sae_lens"], "library_name": "saelens", "files": files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repos", type=int, default=5000)
    ap.add_argument("--changed", type=int, default=10)
    args = ap.parse_args()
    repos = [_repo(i) for i in range(args.repos)]
    with tempfile.TemporaryDirectory() as tmp, HubSim({"page_size": 1000, "repos": repos}) as sim:
        root = Path(tmp)
        watch = {"registry": False, "authors": AUTHORS, "tags": ["sae_lens"], "searches": ["gemma-scope"],
                 "lock_timeout_s": 600.0}
        (root / "params.yaml").write_text(yaml.safe_dump({"tuples": [{"layer": 1, "site": "resid_pre"},
                                                                     {"layer": 3, "site": "resid_post"}],
                                                          "watch": watch}))
        env = hub_env(sim.url, root / "hf_home")
        rows = []
        for label in ("first poll", "no-change poll", f"{args.changed} repos changed"):
            if label.endswith("changed"):
                sim.set_scenario({"page_size": 1000, "repos": [_repo(i, 2 if i < args.changed else 1)
                                                                for i in range(args.repos)]})
            sim.counts.clear()
            t0 = time.perf_counter()
            res = subprocess.run(watch_command(root / "slept.json", "--state", str(root / "state.json")), cwd=root,
                                 env=env, capture_output=True, text=True)
            elapsed = time.perf_counter() - t0
            if res.returncode not in (0, 10):
                sys.exit(f"{label}: exit {res.returncode}\n{res.stderr}")
            rows.append((label, elapsed, dict(sim.counts), res.stdout.splitlines()[0]))
    print(f"sasgate watch over an imitation Hub of {args.repos} repos ({len(AUTHORS)} authors + 1 tag + 1 search "
          "listed; pages of 1000)")
    print(f"{'poll':<18} {'wall s':>7} {'list':>5} {'tree':>5} {'head':>5} {'file':>5}")
    for label, elapsed, c, _ in rows:
        print(f"{label:<18} {elapsed:7.1f} {c.get('list', 0):5d} {c.get('tree', 0):5d} {c.get('head', 0):5d} "
              f"{c.get('file', 0):5d}")
    print(rows[-1][3])


if __name__ == "__main__":
    main()
