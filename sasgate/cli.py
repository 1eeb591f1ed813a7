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
  7  a released scorer version's code changed (add a new version instead)
  8  remediation without a preregistration, or the stop rules changed after it
  9  nothing to steer with (no DIM candidate can be scored, no SAE latent separates the classes)
  10 sasgate watch: the reopen condition is met and not yet reported (see sasgate watch --help)
  11 a gate record contradicts its own rows or another record (decide refuses; sasgate
     report: a gate record is not the one decision.json was made from)
  12 a preregistration timestamp that does not verify (another digest, an untrusted
     TSA certificate, a malformed token), or the TSA could not be reached
  14 sasgate sweep: not submitted or not collected (remotes, dirty tree, baseline), or a point failed
  75 sasgate watch: the Hub could not be read; nothing was claimed or written
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


# --- the locked scorer (issue 3) ------------------------------------------------------------


@main.group()
def scorer() -> None:
    """The versioned refusal scorer and its locked, labelled check set (data/scorer_check.jsonl)."""


@scorer.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the versions as JSON")
@fails_cleanly
def scorer_list(as_json: bool) -> None:
    """Every scorer version: sha256 and state (ok, tampered, unreleased, missing); * marks the default.

    Exit 7 when a released version's file no longer matches its recorded sha256.
    """
    from .errors import ScorerTamperedError
    from .scorers import DEFAULT_VERSION, list_versions

    versions = list_versions()
    if as_json:
        click.echo(json.dumps({"default": DEFAULT_VERSION, "versions": [
            {"version": v.version, "sha256": v.sha256, "released_sha256": v.released_sha256, "state": v.state}
            for v in versions]}, indent=2, sort_keys=True))
    else:
        for v in versions:
            mark = "*" if v.version == DEFAULT_VERSION else " "
            click.echo(f"{mark} {v.version:<4} {v.state:<10} {v.sha256 or '-'}")
    if any(v.state in ("tampered", "missing") for v in versions):
        sys.exit(ScorerTamperedError.exit_code)


@scorer.command("check")
@click.option("--version", "version", default=None, help="scorer version [default: the default version]")
@click.option("--json", "as_json", is_flag=True, help="print the full agreement report as JSON")
@fails_cleanly
def scorer_check(version: str | None, as_json: bool) -> None:
    """Agreement of a scorer version with the locked check set: overall, per kind, and every disagreement."""
    from .scorers import DEFAULT_VERSION, agreement, load_check_set, load_scorer

    report = agreement(load_scorer(version or DEFAULT_VERSION), load_check_set(Paths.at(".")))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True, ensure_ascii=False))
        return
    n_agree = round(report.agreement * report.n)
    click.echo(f"scorer {report.version} (sha256 {report.sha256}): agreement {report.agreement:.3f} "
               f"({n_agree}/{report.n})")
    for kind, value in report.per_kind.items():
        click.echo(f"  {kind:<34} {value:.3f}")
    for d in report.disagreements:
        click.echo(f"  disagrees: {d['id']} labelled {d['label']}, scored {d['predicted']}: {d['completion']!r}")


@scorer.command("lock")
@click.option("--reason", required=True, help="why the check set changes (kept in the lock history)")
@fails_cleanly
def scorer_lock(reason: str) -> None:
    """Re-lock the check set: record the sha256 of data/scorer_check.jsonl in data/scorer_check.lock.

    Scorer agreement (the `validity` gate, `sasgate scorer check`) refuses to run while the check
    set differs from its lock; this is the one deliberate way to change it.
    """
    from .scorers import lock_check_set

    record = lock_check_set(Paths.at("."), reason)
    click.echo(f"locked {record['n_items']} check items, sha256 {record['sha256']} "
               f"({len(record['history'])} in history)")


# --- preregistration, status, claims (issue 5) ---------------------------------------------


@main.command()
@click.option("--reason", required=True, help="why the remediation protocol is (re)fixed (kept in the lock history)")
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--tsa", "tsa", metavar="URL", help="also get an RFC 3161 timestamp over the lock from this TSA")
@click.option("--tsa-cert", "tsa_cert", type=click.Path(dir_okay=False, exists=True),
              help="the CA certificate (PEM) that issued the TSA's certificate: the timestamp must chain to it (with --tsa)")
@fails_cleanly
def preregister(reason: str, params_file: str, tsa: str | None, tsa_cert: str | None) -> None:
    """Fix the remediation protocol before it runs: write preregistration/lock.json.

    Records the sha256 of preregistration/stop_rules.yaml, the protocol params it reads (required
    tuples, model, reconstruction threshold, remediation families and constraints), the git commit
    and the gate records that exist now (a protocol fixed after them is flagged by `status` and
    said in decision.json and CLAIMS.md). `remediation` refuses to run when any of it changes
    (exit 8). With --tsa URL --tsa-cert FILE the lock is timestamped (RFC 3161) and the reply
    kept in preregistration/timestamp.tsr, the certificate in preregistration/tsa.pem; nothing
    is written when the TSA fails or its reply does not verify (exit 12).
    """
    from pathlib import Path

    from .errors import ParamsError
    from .preregistration import check_timestamp, in_time
    from .preregistration import preregister as write_preregistration

    if not reason.strip():
        raise ParamsError("a preregistration needs a non-empty --reason")
    paths = Paths.at(".")
    lock = write_preregistration(load_params(params_file), paths, reason, tsa, Path(tsa_cert) if tsa_cert else None)
    click.echo(f"preregistered {lock['counts']['rules']} stop rules and {lock['counts']['families']} families "
               f"(sha256 {lock['sha256']}) at commit {lock['git_commit'] or '(none)'}")
    click.echo(in_time(lock).text)
    stamp = check_timestamp(paths)
    click.echo(f"timestamp: {stamp.gen_time} by {stamp.tsa}" if stamp else "timestamp: none")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--record", "record", type=click.Path(dir_okay=False),
              help="decide a study record (e.g. records/original-study.yaml) instead of this project")
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--tsa-cert", "tsa_cert", type=click.Path(dir_okay=False, exists=True),
              help="check the preregistration timestamp against this TSA CA certificate (PEM) "
                   "[default: preregistration/tsa.pem]")
@fails_cleanly
def status(as_json: bool, record: str | None, params_file: str, tsa_cert: str | None) -> None:
    """The decision, every gate (status, key figure, threshold), the reopen conditions, and whether
    what is on disk is what the pipeline wrote: for every stage dvc.yaml declares, its manifest
    exists and is well-formed, every out exists, matches it and is listed in it, and `dvc status`
    reports nothing (each problem names the stage).

    With --record FILE: the study record's figures go through the same state machine; prints its
    decision and CLAIMS.md and whether they reproduce the study's recorded conclusion.
    Exit 1 when something is flagged (a missing or changed artifact or manifest, a stale decision,
    an edited CLAIMS.md, a record whose conclusion is not reproduced, a protocol preregistered after
    the results it judges). Exit 12 when the preregistration's RFC 3161 timestamp does not verify.
    """
    from . import status as st

    if record:
        report = st.record_report(record)
        text = st.format_record(report)
    else:
        from pathlib import Path

        report = st.project_report(load_params(params_file), Paths.at("."), Path(tsa_cert) if tsa_cert else None)
        text = st.format_project(report)
    click.echo(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) if as_json else text)
    if st.exit_code(report):
        sys.exit(st.exit_code(report))


@main.group()
def claims() -> None:
    """Check prose against what the decision allows."""


@claims.command("lint")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--decision", "decision_file", type=click.Path(dir_okay=False),
              help="decision.json to check against [default: ./decision.json]")
@click.option("--record", "record", type=click.Path(dir_okay=False), help="a study record to check against instead")
@click.option("--json", "as_json", is_flag=True, help="print the findings as JSON")
@fails_cleanly
def claims_lint(files: tuple[str, ...], decision_file: str | None, record: str | None, as_json: bool) -> None:
    """The overclaim guard: report statements of mechanism, causation, robustness beyond what was
    tested, or phase advancement that the decision disallows, with file, line and claim id.

    Negated ("we cannot claim that ..."), hedged and quoted statements are not flagged.
    Exit 1 when any overclaim is found, 0 otherwise.
    """
    from .claims_lint import lint_files
    from .decision import read_decision
    from .errors import ParamsError
    from .status import decide_record

    if decision_file and record:
        raise ParamsError("give --decision or --record, not both")
    decision = decide_record(record)[0] if record else read_decision(decision_file or "decision.json")
    disallowed = [c.id for c in decision.claims.disallowed]
    found = lint_files(files, disallowed)
    if as_json:
        click.echo(json.dumps({"decision_state": decision.decision_state, "disallowed": disallowed,
                               "findings": [f.as_dict() for f in found]}, indent=2, sort_keys=True,
                              ensure_ascii=False))
    else:
        for f in found:
            click.echo(str(f))
        click.echo(f"{len(found)} overclaim(s) in {len(files)} file(s) against decision {decision.decision_state}",
                   err=True)
    if found:
        sys.exit(1)


# --- plan (issue 7) --------------------------------------------------------------------------


@main.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--tokens-per-prompt", type=click.IntRange(min=1),
              help="assumed prompt length for eval sets not resolved offline (default 48; the toy's is exact)")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@fails_cleanly
def plan(params_file: str, tokens_per_prompt: int | None, as_json: bool) -> None:
    """Dry run: what each stage would load and compute, and the disk and memory it needs.

    Nothing is downloaded (the Hugging Face Hub is forced offline) and nothing is written.
    """
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"  # before params validation imports transformer-lens
    from .plan import format_plan, plan as make_plan

    report = make_plan(load_params(params_file), tokens_per_prompt)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else format_plan(report))


# --- report (issue 17) -----------------------------------------------------------------------


@main.command()
@click.option("--out", type=click.Path(dir_okay=False),
              help="the page to write [default: ROOT/report.html, the one the `report` stage writes]")
@click.option("--root", default=".", show_default=True, type=click.Path(file_okay=False),
              help="project root (holds dvc.yaml)")
@click.option("--check", is_flag=True,
              help="write nothing; exit 1 when OUT is not the page the records render to now (DVC cannot track "
                   "dvc.yaml: after editing a plot declaration, run `dvc repro -f report`)")
@fails_cleanly
def report(out: str | None, root: str, check: bool) -> None:
    """Write the report: one self-contained HTML page (no script, loads nothing, opens offline) of the
    decision and its table row, every gate, the claims, the reopen conditions, every plot dvc.yaml
    declares (SVG) and the provenance, from the records alone; byte-identical for the same records.

    \b
    Exit codes: 5 a record is missing or corrupt (run `dvc repro`), 11 a gate record is not the
    one decision.json was made from (re-run `decide`), 1 with --check: OUT is stale. A plot that
    cannot be drawn is shown as failed on the page and named on stderr.
    """
    from pathlib import Path

    from .artifacts import atomic_write_text
    from .report import build

    records, text = build(root)
    out = out or str(Path(root) / "report.html")
    if check:
        page = Path(out)
        if not page.is_file() or page.read_bytes() != text.encode("utf-8"):
            click.echo(f"{out} is {'missing' if not page.is_file() else 'stale'}: it is not the page the records "
                       "render to now; run `dvc repro -f report` (or `sasgate report`)", err=True)
            sys.exit(1)
        click.echo(f"{out} is current")
        return
    atomic_write_text(out, text)
    failed = [c.error for c in records.charts if c.error]
    for err in failed:
        click.echo(f"warning: {err}", err=True)
    click.echo(f"wrote {out}: decision {records.decision.decision_state}, {len(records.gates)} gate records, "
               f"{len(records.charts) - len(failed)}/{len(records.charts)} plots drawn")


# --- archive (issue 6) -----------------------------------------------------------------------
from .archive.cli import archive as _archive  # noqa: E402  (after fails_cleanly, which it uses)

main.add_command(_archive)

# --- watch (issue 4) -------------------------------------------------------------------------
from .watch.cli import watch as _watch  # noqa: E402

main.add_command(_watch)

# --- sweep (issue 18) -------------------------------------------------------------------------
from .sweep.cli import sweep as _sweep  # noqa: E402

main.add_command(_sweep)


if __name__ == "__main__":
    main()
