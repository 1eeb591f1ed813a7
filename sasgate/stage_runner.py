"""The thin `python -m sasgate.stages.<name>` entry shared by every stage.

It validates params before any compute, makes sure OpenMP runs with the wait policy params ask
for (sasgate/omp.py), makes torch deterministic, runs the stage, and logs wall time, thread count
and wait policy to logs/runs.jsonl (not a DVC output).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any, Callable

import click

from . import omp
from .errors import SasgateError
from .params import Params, load_params
from .paths import Paths

StageFn = Callable[[Params, Paths], Any]


def run_stage(name: str, fn: StageFn, params_file: str = "params.yaml", root: str = ".",
              device: str | None = None) -> Any:
    paths = Paths.at(root)
    from .determinism import make_deterministic
    from .device import compute_record, with_device

    params = with_device(load_params(paths.root / params_file), device)
    omp.ensure(params.runtime.omp_wait_policy)

    make_deterministic(params.runtime.seed, params.runtime.threads, params.runtime.device)
    start = time.perf_counter()
    result = fn(params, paths)
    _log(paths, {"stage": name, "seconds": round(time.perf_counter() - start, 3), "host": platform.node(),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **compute_record(params),
                 "threads": params.runtime.threads, **omp.record()})
    return result


def _log(paths: Paths, entry: dict) -> None:
    paths.run_log.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.run_log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


def stage_main(name: str, fn: StageFn) -> None:
    """Entry point for `python -m sasgate.stages.<name>`: errors become one message and an exit code."""

    @click.command(name=name, help=f"Run the `{name}` stage (what dvc.yaml calls).")
    @click.option("--params", "params_file", default="params.yaml", show_default=True, help="params file")
    @click.option("--root", default=".", show_default=True, help="project root (holds dvc.yaml)")
    @click.option("--device", default=None, help="cpu, cuda or mps: overrides runtime.device (also $SASGATE_DEVICE)")
    def cmd(params_file: str, root: str, device: str | None) -> None:
        try:
            run_stage(name, fn, params_file, root, device)
        except SasgateError as exc:
            click.echo(f"sasgate {name}: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    cmd(standalone_mode=True)
