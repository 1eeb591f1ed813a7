"""Memory: `collect`'s peak RSS capturing N and 4N prompts. Target 4N / N <= 1.2 (streaming).

Each size runs in a fresh child process (`python -m benchmarks.bench_memory WORK N OUT THREADS`) that
loads the toy model, resets its peak-RSS mark (Linux VmHWM), runs collect's `capture_split` (every
required tuple, streamed to safetensors) over N prompts (the eval set's texts, cycled), then
reports the peak RSS of the capture. N is
chosen so that the activations written at N are of the order of the process's baseline
(python + torch + model), so that accumulating them would show: the table also prints the
ratio an accumulating implementation would reach.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .common import REPO, Result


def _child(work: Path, n: int, out: Path, threads: int) -> dict:
    import psutil

    from sasgate.evalset import resolve_eval_set
    from sasgate.stages.collect import capture_split

    from .common import build_toy

    params, paths, chat = build_toy(work, threads)
    texts = resolve_eval_set(params, paths)
    items = [texts[i % len(texts)] for i in range(n)]
    _reset_peak()  # the peak of the capture, not of the imports before it
    baseline = psutil.Process().memory_info().rss
    out.mkdir(parents=True, exist_ok=True)
    n_tokens = capture_split(chat, items, params.tuples, out, params.collect.batch_size)
    written = sum(f.stat().st_size for f in out.iterdir())
    return {"n": n, "tokens": n_tokens, "written": written, "baseline_rss": baseline, "peak_rss": _peak()}


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(work: Path, n: int, threads: int) -> dict:
    out = work / f"memory-{n}"
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", str(work), str(n), str(out), str(threads)],
                         cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory child for N={n} failed:\n{res.stderr[-3000:]}")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def peak_rss_ratio(work: Path, n: int, threads: int) -> Result:
    small, large = measure(work, n, threads), measure(work, 4 * n, threads)
    ratio = large["peak_rss"] / small["peak_rss"]
    accumulating = (large["baseline_rss"] + large["written"]) / (small["baseline_rss"] + small["written"])
    mib = 2**20
    return Result("collect peak RSS 4N / N", ratio, "<= 1.2", ratio <= 1.2,
                  f"baseline {small['baseline_rss'] / mib:.0f} MiB; "
                  f"N={n}: peak {small['peak_rss'] / mib:.0f} MiB, wrote {small['written'] / mib:.0f} MiB; "
                  f"4N: peak {large['peak_rss'] / mib:.0f} MiB, wrote {large['written'] / mib:.0f} MiB; "
                  f"accumulating would give >= {accumulating:.2f}")


if __name__ == "__main__":
    print(json.dumps(_child(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))))
