"""`sasgate watch`: one poll per run, made for cron (registered in sasgate/cli.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

WATCH_EXIT_CODES = """\b
Exit codes:
  0   polled; nothing new completes the coverage (or the reopen was already reported)
  10  the reopen condition is newly met: every required tuple is covered by an SAE not seen at lock time
  75  the Hub could not be read (network error, HTTP 5xx/429 after retries with backoff, malformed
      JSON) or another run held the state lock too long; the state is untouched, no reopen is claimed
  2   usage or config error (params, decision.json, state file)
  5   --evaluate without the project's eval activations
"""


@click.command(epilog=WATCH_EXIT_CODES)
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="required tuples, remediation.constraints and the watch settings")
@click.option("--decision", "decision_file", type=click.Path(dir_okay=False),
              help="take the required tuples from this decision.json's SAE-coverage reopen condition instead")
@click.option("--state", "state_file", type=click.Path(dir_okay=False),
              help="the state file [default: params watch.state, watch/state/state.json]")
@click.option("--registry-only", is_flag=True, help="check the installed sae-lens registry alone (no network)")
@click.option("--json", "as_json", is_flag=True, help="print the machine-readable report")
@click.option("--evaluate", is_flag=True,
              help="fetch the newly covering SAEs (safetensors only) and run the reconstruction gate on the eval "
                   "activations: would the reopened path pass?")
@click.option("--notify-url", metavar="URL", help="POST the JSON report here when the reopen condition is newly met")
def watch(**kwargs: Any) -> None:
    """Poll the sae-lens registry and the Hub once for SAE releases that cover the required tuples.

    Reads what changed since the last poll (repos whose sha is unchanged are not re-read), reports
    the coverage k/N per tuple and what is new, and keeps its state in a JSON file written
    atomically under a file lock. The first poll of a state file records the lock-time baseline.
    HF_ENDPOINT (a mirror) and HF_TOKEN are respected.
    """
    from sasgate.cli import fails_cleanly

    fails_cleanly(_watch)(**kwargs)


def _watch(params_file: str, decision_file: str | None, state_file: str | None, registry_only: bool,
           as_json: bool, evaluate: bool, notify_url: str | None) -> None:
    from sasgate.params import load_params
    from sasgate.paths import Paths

    from . import poll
    from .coverage import required

    params = load_params(params_file)
    req = poll.required_from_decision(decision_file) if decision_file else required(params)
    settings = params.watch
    state = Path(state_file or settings.state)
    report = poll.poll(req, settings, params.remediation.constraints, poll.PollOptions(state, registry_only))
    if evaluate:
        from .evaluate import evaluate as run_evaluation

        report["evaluation"] = run_evaluation(report, params, Paths.at("."))
    if notify_url and report["reopen"]["met"] and not report["reopen"]["notified"]:
        from .notify import post

        problem = post(notify_url, report, settings.timeout_s)
        if problem:
            click.echo(f"warning: the reopen notification to {notify_url} failed ({problem}); the next poll "
                       "tries again", err=True)
        else:
            poll.mark_notified(state, settings)
            report["reopen"]["notified"] = True
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        from .report import human

        click.echo(human(report))
    sys.exit(report["exit_code"])
