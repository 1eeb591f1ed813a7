"""`sasgate sweep`: submit a grid as a job array, watch it, collect it, resubmit what failed."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import SweepError

EPILOG = """\b
Exit codes: 0 ok; 2 invalid params; 14 the sweep could not be submitted or collected
(no git/DVC remote, a dirty tree, an unreproduced or unpushed baseline, an invalid point),
or some point failed or has not come back yet (listed with its log)."""


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """sasgate.cli.fails_cleanly, looked up when the command runs (sasgate.cli imports this module)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..cli import fails_cleanly as wrap

        return wrap(fn)(*args, **kwargs)

    return wrapper


def _settings(params_file: str, **flags: Any):
    from ..params import load_params
    from .settings import SweepParams

    base = load_params(params_file).sweep.model_dump()
    slurm = {k: flags.pop(k) for k in ("partition", "array_parallelism") if flags.get(k) is not None}
    base.update({k: v for k, v in flags.items() if v is not None})
    base["slurm"] = {**base["slurm"], **slurm}
    try:
        return SweepParams.model_validate(base, strict=False)
    except ValueError as exc:
        raise SweepError(f"invalid sweep settings: {exc}") from None


def _record(params_file: str, sweep_id: str | None):
    from ..params import load_params
    from . import record

    return record.read(Path(load_params(params_file).sweep.folder), sweep_id)


def _print_states(statuses, as_json: bool, table: str = "") -> None:
    if as_json:
        click.echo(json.dumps({"points": [s.as_dict() for s in statuses], "table": table}, indent=2, sort_keys=True))
        return
    if table:
        click.echo(table.rstrip())
    for s in statuses:
        p = s.point
        click.echo(f"p{p.index}  {p.name}  {' '.join(p.overrides)}  {s.job.state}  "
                   f"(job {p.attempts[-1].job_id}, attempt {len(p.attempts)})")
        if s.job.state == "failed":
            click.echo(f"    error: {s.job.error}\n    log: {s.job.log}\n    stderr: {s.job.err_log}")


def _exit_unless_all(statuses, rec, want_done: bool) -> None:
    failed = [s.point.index for s in statuses if s.job.state == "failed"]
    running = [s.point.index for s in statuses if s.job.state == "running"]
    if failed:
        click.echo(f"error: {len(failed)} of {len(statuses)} points failed ({', '.join(f'p{i}' for i in failed)}): "
                   f"`sasgate sweep resubmit {rec.id}` submits them again", err=True)
        sys.exit(SweepError.exit_code)
    if want_done and running:
        click.echo(f"error: {len(running)} point(s) not finished yet: collect again later, or with --wait", err=True)
        sys.exit(SweepError.exit_code)


@click.group(epilog=EPILOG)
def sweep() -> None:
    """Sweeps beyond one machine: a grid of `dvc exp run` points as a submitit job array (Slurm or
    this machine). Each job clones the git remote at the sweep's commit, pulls what its point needs
    from the DVC remote, runs the point and pushes its experiment; `collect` pulls them back."""


@sweep.command("submit", epilog=EPILOG)
@click.option("-S", "--set-param", "overrides", multiple=True, required=True, metavar="KEY=V1,V2",
              help="a params.yaml key and its values (dvc exp run -S syntax); several -S make a grid")
@click.option("--executor", type=click.Choice(["local", "slurm"]), help="[default: sweep.executor]")
@click.option("--partition", help="Slurm partition [default: sweep.slurm.partition]")
@click.option("--time-min", type=click.IntRange(min=1), help="wall-time limit of a point [default: sweep.time_min]")
@click.option("--gpus", "gpus_per_node", type=click.IntRange(min=0), help="GPUs per job [default: sweep.gpus_per_node]")
@click.option("--parallelism", "array_parallelism", type=click.IntRange(min=1),
              help="Slurm array points at once [default: sweep.slurm.array_parallelism]")
@click.option("--git-remote", help="[default: sweep.git_remote]")
@click.option("--dvc-remote", help="[default: sweep.dvc_remote, else the default DVC remote]")
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@fails_cleanly
def submit(overrides: tuple[str, ...], params_file: str, **flags: Any) -> None:
    """Submit a grid from the committed, reproduced and pushed baseline as one job array."""
    from . import sweeps

    rec = sweeps.submit(Path("."), _settings(params_file, **flags), list(overrides))
    click.echo(f"sweep {rec.id}: {len(rec.points)} point(s) submitted to {rec.settings.executor} "
               f"from commit {rec.commit[:12]}")
    for p in rec.points:
        click.echo(f"p{p.index}  {p.name}  {' '.join(p.overrides)}  job {p.attempts[-1].job_id}")


@sweep.command("status", epilog=EPILOG)
@click.argument("sweep_id", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@fails_cleanly
def status(sweep_id: str | None, as_json: bool, params_file: str) -> None:
    """Each point's state (running, succeeded, failed with its log); the latest sweep by default."""
    from . import sweeps

    rec = _record(params_file, sweep_id)
    got = sweeps.states(Path("."), rec)
    _print_states(got, as_json)
    _exit_unless_all(got, rec, want_done=False)


@sweep.command("collect", epilog=EPILOG)
@click.argument("sweep_id", required=False)
@click.option("--wait", is_flag=True, help="wait until no point is running")
@click.option("--timeout", type=click.FloatRange(min=0), help="seconds --wait waits at most")
@click.option("--json", "as_json", is_flag=True)
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@fails_cleanly
def collect(sweep_id: str | None, wait: bool, timeout: float | None, as_json: bool, params_file: str) -> None:
    """Pull every finished point's experiment (`dvc exp pull`), check it is what its job computed,
    and show them (`dvc exp show`); exit 14 while a point failed or is not back."""
    from . import sweeps

    rec = _record(params_file, sweep_id)
    if wait:
        sweeps.wait(Path("."), rec, timeout)
    got, table = sweeps.collect(Path("."), rec)
    _print_states(got, as_json, table)
    _exit_unless_all(got, rec, want_done=True)


@sweep.command("resubmit", epilog=EPILOG)
@click.argument("sweep_id", required=False)
@click.option("--point", "points", type=click.IntRange(min=0), multiple=True,
              help="a failed point's index (repeatable) [default: every failed point]")
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@fails_cleanly
def resubmit(sweep_id: str | None, points: tuple[int, ...], params_file: str) -> None:
    """Submit the failed points again (same commit, remotes and settings); the others stay as they are."""
    from . import sweeps

    rec, again = sweeps.resubmit(Path("."), _record(params_file, sweep_id), list(points))
    if not again:
        click.echo(f"sweep {rec.id}: no failed point to resubmit")
    for p in again:
        click.echo(f"p{p.index}  {p.name}  {' '.join(p.overrides)}  job {p.attempts[-1].job_id} "
                   f"(attempt {len(p.attempts)})")

