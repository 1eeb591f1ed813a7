"""`sasgate watch`: one poll per run, made for cron (registered in sasgate/cli.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from sasgate.params import Params

WATCH_EXIT_CODES = """\b
Exit codes:
  0   polled; nothing new completes the coverage (or the reopen was already reported)
  10  the reopen condition is met and not yet reported: every required tuple is covered by an SAE
      not seen at lock time (until a run's report reaches you, every poll exits 10 again)
  75  the Hub could not be read (network error, HTTP 5xx/429 after retries with backoff, malformed
      JSON, a request stalled past watch.timeout_s) or another run held the state lock too long;
      the state is untouched, no reopen is claimed. A repo the Hub refuses (gated, disabled,
      private, gone) is a skip, read again on every poll, never a 75
  2   usage or config error (params, decision.json, a malformed state file: left as it is)
  5   --evaluate without the project's eval activations; a met reopen stays pending
  1   the report could not be written out; a met reopen stays pending
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

    Reads what changed since the last poll (repos whose sha is unchanged are not read again, unless
    the Hub refused them last time), reports the coverage k/N per tuple and what is new, and keeps
    its state in a typed JSON file written atomically under a file lock held for the whole run. The
    first poll of a state file records the lock-time baseline. Model names are resolved through
    transformer-lens's aliases, owner included. Every Hub request waits at most watch.timeout_s.
    HF_ENDPOINT (a mirror) and HF_TOKEN are respected.
    """
    from sasgate.cli import fails_cleanly

    fails_cleanly(_watch)(**kwargs)


def _watch(params_file: str, decision_file: str | None, state_file: str | None, registry_only: bool,
           as_json: bool, evaluate: bool, notify_url: str | None) -> None:
    from sasgate.params import load_params

    from . import poll
    from .coverage import required
    from .state import locked

    params = load_params(params_file)
    req = poll.required_from_decision(decision_file) if decision_file else required(params)
    settings = params.watch
    state = Path(state_file or settings.state)
    with locked(state, settings.lock_timeout_s):  # held until the report is out: one run reports a reopen
        report = poll.poll(req, settings, params.remediation.constraints, poll.PollOptions(state, registry_only))
        if evaluate:
            report["evaluation"] = _evaluation(report, params)
        if notify_url and report["reopen"]["met"] and not report["reopen"]["notified"]:
            from .notify import post

            problem = post(notify_url, report, settings.timeout_s)
            if problem:
                click.echo(f"warning: the reopen notification to {notify_url} failed ({problem}); the next poll "
                           "tries again", err=True)
            else:
                poll.mark(state, notified=True)
                report["reopen"]["notified"] = True
        _emit(report, as_json)
        if report["reopen"]["newly_met"]:
            poll.mark(state, reported=True)
    sys.exit(report["exit_code"])


def _evaluation(report: dict[str, Any], params: "Params") -> dict[str, Any]:
    """--evaluate; when it cannot finish, its own error (and exit code) says the reopen stays pending."""
    from sasgate.errors import SasgateError
    from sasgate.paths import Paths

    from .evaluate import evaluate

    try:
        return evaluate(report, params, Paths.at("."))
    except SasgateError as exc:
        if not report["reopen"]["newly_met"]:
            raise
        raise type(exc)(f"{exc}\n--evaluate did not finish: the reopen condition is met and stays pending; the next "
                        "poll reports it again (exit 10)") from None


def _emit(report: dict[str, Any], as_json: bool) -> None:
    """Write the report out (flushed): only then has it reached the caller."""
    from sasgate.errors import SasgateError

    from .report import human

    try:
        click.echo(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) if as_json else human(report))
        sys.stdout.flush()
    except OSError as exc:
        pending = " the reopen condition is met and stays pending;" if report["reopen"]["newly_met"] else ""
        raise SasgateError(f"could not write the report ({exc});{pending} the next poll reports again") from None
