"""The `sasgate` command line."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from . import __version__
from .errors import SasgateError
from .params import load_params
from .paths import Paths

EXIT_CODES = """\b
Exit codes:
  0  success
  2  invalid params or usage
  3  locked input changed (eval set)
  4  leakage between selection and eval
  5  missing or corrupt artifact
  6  unreadable data source
"""


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a SasgateError into one message on stderr and its distinct exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SasgateError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


@click.group(epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="sasgate")
def main() -> None:
    """sasgate: a gated SAE-steering experiment, reproducible with DVC, auditable and shareable."""


@main.group()
def params() -> None:
    """Inspect and validate params.yaml."""


@params.command("check")
@click.argument("file", default="params.yaml", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the validated params (defaults filled in) as JSON")
@fails_cleanly
def params_check(file: str, as_json: bool) -> None:
    """Validate FILE (default params.yaml) against the schema; exit 2 naming each bad key."""
    p = load_params(file)
    if as_json:
        click.echo(json.dumps(p.model_dump(mode="json"), indent=2, sort_keys=True))
    else:
        click.echo(f"{file}: ok ({p.model.name}, {len(p.tuples)} required tuples: {', '.join(p.tuple_keys)})")


@main.command()
@click.option("--reason", required=True, help="why the locked evaluation set changes (kept in the lock history)")
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@fails_cleanly
def lock(reason: str, params_file: str) -> None:
    """Re-lock the evaluation set: record the sha256 of the resolved set in data/eval.lock.

    `collect` refuses to run while the resolved set differs from the lock; this is
    the one deliberate way to change it, and the reason is appended to the history.
    """
    from .evalset import relock

    p = load_params(params_file)
    paths = Paths.at(".")
    record = relock(p, paths, reason)
    click.echo(f"locked {record['n_items']} items, sha256 {record['sha256']} ({len(record['history'])} in history)")


if __name__ == "__main__":
    main()
