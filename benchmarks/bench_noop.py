"""No-op `dvc repro` on a reproduced project (README: the default params): wall time, and the share of it spent in
sasgate's own code (sasgate/, stages/, watch/, archive/), from a cProfile of the same command.

A no-op repro only hashes deps and outs against dvc.lock (mtime-cached in DVC's state db) and
runs no stage, so sasgate's share should be nil; the figure shows nothing of ours sneaks in.
"""

from __future__ import annotations

import pstats
import subprocess
import sys
import time
from pathlib import Path

from .common import REPO, Result, best, runs

OWN = tuple(str(REPO / d) + "/" for d in ("sasgate", "stages", "watch", "archive"))


def _repro(project: Path, *prefix: str) -> float:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, *prefix, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"dvc repro failed in {project}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    if "Running stage" in res.stdout:
        raise RuntimeError(f"dvc repro in {project} was not a no-op:\n{res.stdout[-2000:]}")
    return dt


def own_share(profile: Path) -> tuple[float, float]:
    """(seconds of self time in sasgate's files, total profiled seconds)."""
    stats = pstats.Stats(str(profile))
    own = sum(tt for (file, _, _), (_, _, tt, _, _) in stats.stats.items() if file.startswith(OWN))
    return own, stats.total_tt


def noop_repro(project: Path, label: str, work: Path, repeats: int) -> Result:
    _repro(project)  # warm: DVC's state db knows every file's hash after this
    walls = [_repro(project) for _ in range(repeats)]
    prof = work / "noop.prof"
    _repro(project, "-m", "cProfile", "-o", str(prof))
    own, total = own_share(prof)
    share = own / total if total else 0.0
    return Result("no-op dvc repro: sasgate share", share, "-", None,
                  f"{label}; wall {best(walls):.2f} s {runs(walls)}; sasgate code {own * 1e3:.1f} ms of "
                  f"{total:.2f} s profiled")
