"""What the benchmarks share: the default-architecture toy model, side-by-side timing, results.

Speed does not depend on what the weights learned, so the toy is trained for a few steps
only; its architecture, eval set and batch sizes are params.yaml's defaults.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
BENCH_TRAIN_STEPS = 20
NAME_WIDTH = 38  # of the table's first column ("SmolLM2 steer one-at-a-time / batched")


@dataclass
class Result:
    """One figure of the results table."""

    name: str
    ratio: float
    target: str
    ok: bool | None  # None: no target (a measurement only)
    detail: str

    def line(self) -> str:
        verdict = {True: "ok", False: "MISS", None: "-"}[self.ok]
        return f"{self.name:<{NAME_WIDTH}} {self.ratio:>8.3f}  {self.target:<10} {verdict:<4}  {self.detail}"


def default_raw(**sections: dict) -> dict:
    """params.yaml of the repository with some sections replaced or merged (a plain mapping)."""
    sys.path.insert(0, str(TESTS))
    from projects import merge

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    return merge(raw, copy.deepcopy(sections))


def build_toy(work: Path, threads: int):
    """(params, paths, chat model) of a default-architecture toy trained for a few steps in `work`,
    torch limited to `threads` intra-op threads."""
    from sasgate.determinism import make_deterministic
    from sasgate.modeling import load_chat_model
    from sasgate.params import parse_params
    from sasgate.paths import Paths
    from sasgate.stages import model as model_stage

    params = parse_params(default_raw(model={"toy": {"train_steps": BENCH_TRAIN_STEPS}}))
    make_deterministic(params.runtime.seed, threads, params.runtime.device)
    paths = Paths.at(work / "toy")
    if not (paths.model_dir / "model.safetensors").is_file():
        paths.root.mkdir(parents=True, exist_ok=True)
        model_stage.run(params, paths)
    return params, paths, load_chat_model(params, paths)


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each function, run alternately `repeats` times after one untimed warm-up
    each, so drifting load on a shared machine hits every contender alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def best(xs: list[float]) -> float:
    """The fastest run: what the code costs when the shared machine's other load left it alone
    (timeit's rule; medians drift with that load)."""
    return min(xs)


def runs(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"
