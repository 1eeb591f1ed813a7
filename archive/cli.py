"""`sasgate archive`: keygen, export, verify, show."""

from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import click

from sasgate.errors import NotVerifiedError, SasgateError, TimestampError

from . import keys
from .terminal import safe, safe_lines

if TYPE_CHECKING:
    from sasgate.decision import Decision

    from .bundle import BundleInfo

ARCHIVE_EXIT_CODES = """\b
Exit codes (export, keygen):
  0   success
  2   usage error (also a negative or non-finite --rtol/--atol)
  5   missing or corrupt artifact (e.g. no decision.json: run dvc repro;
      a malformed manifest, naming file and field)
  20  the workspace does not match dvc.lock or the sha256 manifests
  21  key file unsafe (readable by others), unreadable, not Ed25519,
      or a private key among the files to bundle
Exit codes (verify, show):
  0   verified (with --reproduce: and bit-exact or decision-equivalent)
  1   not verified, or not reproduced: the first reason names the file
      (show: an unreadable or malformed bundle)
  2   usage error (bad arguments, unreadable public key)
  12  the bundled preregistration timestamp does not verify (another digest, an
      untrusted TSA certificate, a malformed token); export refuses one too
"""


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """sasgate.cli.fails_cleanly (looked up at call time: sasgate.cli imports this module to register it),
    with the message escaped first: a NotVerifiedError quotes the bundle, so it is printed on one line with
    every non-printable character escaped; other errors keep their own line breaks (terminal.safe_lines)."""

    @functools.wraps(fn)
    def escaped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SasgateError as exc:
            text = safe(exc) if isinstance(exc, NotVerifiedError) else safe_lines(str(exc))
            raise type(exc)(text) from None

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sasgate.cli import fails_cleanly as wrap

        return wrap(escaped)(*args, **kwargs)

    return wrapper


@click.group(epilog=ARCHIVE_EXIT_CODES)
def archive() -> None:
    """Signed negative-result bundles that others can verify offline and re-run."""


def _passphrase(passphrase_file: str | None, ask: bool, confirm: bool) -> bytes | None:
    if ask:
        return click.prompt("passphrase", hide_input=True, confirmation_prompt=confirm).encode()
    return keys.read_passphrase(passphrase_file)


@archive.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="folder for sasgate_ed25519 (0600) and sasgate_ed25519.pub")
@click.option("--format", "fmt", type=click.Choice(["openssh", "pem"]), default="openssh", show_default=True,
              help="private key encoding (PEM = PKCS#8, readable by openssl)")
@click.option("--passphrase-file", type=click.Path(dir_okay=False),
              help="encrypt the private key with the first line of this file (or set SASGATE_KEY_PASSPHRASE)")
@click.option("--ask-passphrase", is_flag=True, help="prompt for a passphrase to encrypt the private key")
@click.option("--comment", default="sasgate", show_default=True, help="comment on the OpenSSH public key line")
@click.option("--json", "as_json", is_flag=True, help="print paths, public key and fingerprint as JSON")
@fails_cleanly
def keygen(out_dir: str, fmt: str, passphrase_file: str | None, ask_passphrase: bool, comment: str,
           as_json: bool) -> None:
    """Make an Ed25519 key pair for signing bundles; never overwrites an existing key."""
    kp = keys.generate(out_dir, _passphrase(passphrase_file, ask_passphrase, confirm=True), fmt, comment)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps({"private_key": str(kp.private_path), "public_key": str(kp.public_path),
                               "openssh": kp.public_openssh, "fingerprint": kp.fingerprint}, indent=2))
        return
    click.echo(f"private key: {kp.private_path} (mode 0600; keep it secret, never commit it)")
    click.echo(f"public key:  {kp.public_path}  {kp.fingerprint}")
    click.echo(kp.public_openssh)


@archive.command()
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="Ed25519 private key")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the bundle to write (.tar.gz)")
@click.option("--root", default=".", show_default=True, type=click.Path(file_okay=False),
              help="project root (holds dvc.yaml)")
@click.option("--include-large", is_flag=True, help="bundle DVC-cached artifacts (weights, activations) too")
@click.option("--passphrase-file", type=click.Path(dir_okay=False),
              help="passphrase of an encrypted key (or set SASGATE_KEY_PASSPHRASE; prompted on a terminal)")
@click.option("--signer", help="a name for the signer, recorded in the signed statement")
@click.option("--rtol", type=float, default=None, help="relative tolerance for decision-equivalent re-runs, >= 0 "
              "[default: 0.05]")
@click.option("--atol", type=float, default=None, help="absolute tolerance for decision-equivalent re-runs, >= 0 "
              "[default: 0.001]")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@fails_cleanly
def export(key_path: str, out: str, root: str, include_large: bool, passphrase_file: str | None,
           signer: str | None, rtol: float | None, atol: float | None, as_json: bool) -> None:
    """Write a signed bundle of the pipeline's results; refuses a stale or modified workspace."""
    from .export import DEFAULT_ATOL, DEFAULT_RTOL
    from .export import export as do_export

    passphrase = keys.read_passphrase(passphrase_file)
    if passphrase is None and sys.stdin.isatty() and keys.is_encrypted(key_path):
        passphrase = _passphrase(None, True, confirm=False)
    res = do_export(root, key_path, out, include_large=include_large, passphrase=passphrase, signer=signer,
                    rtol=DEFAULT_RTOL if rtol is None else rtol, atol=DEFAULT_ATOL if atol is None else atol)
    if as_json:
        click.echo(json.dumps({"out": str(res.out), "sha256": res.sha256, "files": res.n_files,
                               "large_listed": res.n_large_listed, "keyid": res.keyid,
                               "decision_state": res.decision_state}, indent=2))
        return
    click.echo(f"wrote {res.out} ({res.n_files} files, sha256 {res.sha256})")
    click.echo(f"signed by {res.keyid}; decision: {res.decision_state}")
    if res.n_large_listed:
        click.echo(f"{res.n_large_listed} large artifacts listed by sha256, not included (--include-large adds them)")


def _load_public(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    try:
        return keys.load_public(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _decision_lines(d: Decision) -> list[str]:
    """A typed decision as text; every string in it may come from a bundle, so each is escaped."""
    lines = [f"decision: {safe(d.decision_state)} (active path {safe(d.active_path)}, "
             f"phase movement authorized: {str(d.phase_movement_authorized).lower()})",
             "gates: " + ", ".join(f"{safe(g)} {safe(s.status)}" for g, s in d.gates.items()),
             "preregistration: " + (safe(d.preregistration.text) if d.preregistration is not None
                                    else "not stated (no preregistration lock behind this decision)")]
    for title, entries in (("we can claim", d.claims.allowed), ("we cannot claim", d.claims.disallowed)):
        lines.append(f"{title}:")
        lines += [f"  - {safe(c.id)}: {safe(c.text)}" for c in entries] or ["  (none)"]
    lines.append("reopen condition:")
    for r in d.reopen_conditions:
        tuples = "; ".join(f"{safe(t.model)} L{t.layer} {safe(t.site)}" for t in r.required_tuples)
        lines.append(f"  - ({safe(r.kind)}) {safe(r.text)}" + (f" Required tuples: {tuples}." if tuples else ""))
    if not d.reopen_conditions:
        lines.append("  - (none) nothing is closed")
    return lines


def _large_line(info: BundleInfo) -> str:
    included = sum(a.included for a in info.large_artifacts)
    remote = info.dvc_remote
    where = f"`dvc pull` from remote {safe(remote.name)} ({safe(remote.url)})" if remote else "no DVC remote recorded"
    return f"large artifacts: {len(info.large_artifacts)} listed by sha256 + DVC md5, {included} included; {where}"


@archive.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "public_key", required=True, type=click.Path(dir_okay=False), callback=_load_public,
              help="the signer's Ed25519 public key (OpenSSH .pub line or PEM)")
@click.option("--reproduce", is_flag=True, help="also re-run the pipeline in a fresh folder and compare")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="folder for --reproduce (absent or empty; kept). Default: a temp folder, removed after")
@click.option("--tsa-cert", type=click.File("rb"), help="check the bundled preregistration timestamp against this "
              "TSA CA certificate, PEM [default: the bundle's own preregistration/tsa.pem]")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def verify(file: str, public_key: Any, reproduce: bool, workdir: str | None, tsa_cert: Any, as_json: bool) -> None:
    """Check FILE's signature, every digest, and that its claims follow from its gate records. Fails closed."""
    if workdir and Path(workdir).exists() and (not Path(workdir).is_dir() or any(Path(workdir).iterdir())):
        raise click.BadParameter(f"{workdir} must be absent or empty", param_hint="--workdir")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sasgate-reproduce-")) if reproduce else None
    try:
        _verify(file, public_key, work, as_json, tsa_cert.read() if tsa_cert else None)
    finally:
        if work is not None and not workdir:
            shutil.rmtree(work, ignore_errors=True)


def _verify(file: str, public_key: Any, work: Path | None, as_json: bool, tsa_cert: bytes | None) -> None:
    from .bundle import BundleInfo
    from .reproduce import reproduce as do_reproduce
    from .verify import verify as do_verify

    report: dict[str, Any] = {"bundle": file, "verified": False}
    try:  # the tree reaches work/bundle only once it verified (a rejected bundle leaves work absent or empty)
        v = do_verify(file, public_key, extract_to=work / "bundle" if work else None, tsa_cert=tsa_cert)
    except Exception as exc:  # fail closed: an unexpected error is never a pass
        reason = str(exc) if isinstance(exc, (NotVerifiedError, TimestampError)) else \
            f"internal error while checking: {type(exc).__name__}: {exc}"
        _fail(report, as_json, "NOT VERIFIED", reason, exc.exit_code if isinstance(exc, TimestampError) else 1)
    report.update(verified=True, keyid=v.keyid, signer=v.signer_name, checks=list(v.checks),
                  git=v.info.get("git"), decision=v.decision.to_json())
    if not as_json:
        info = BundleInfo.model_validate(v.info)
        click.echo(f"VERIFIED {safe(file)}")
        click.echo(f"signed by: {v.keyid} (the key given)"
                   + (f", name {safe(repr(v.signer_name))}" if v.signer_name else ""))
        click.echo(f"git commit: {safe(info.git.commit)} (dirty: {'yes' if info.git.dirty else 'no'})")
        for line in _decision_lines(v.decision) + [_large_line(info), _timestamp_line(v),
                                                   "checks: " + ", ".join(v.checks)]:
            click.echo(line)
    if work is not None:
        if not as_json:
            click.echo(f"reproducing in {work} (dvc repro; installs nothing)...")
        try:
            outcome = do_reproduce(v, work)
        except Exception as exc:
            _fail(report, as_json, "NOT REPRODUCED", f"{type(exc).__name__}: {exc}")
        report["reproduce"] = outcome.to_json()
        if not as_json:
            _print_outcome(outcome)
        if outcome.verdict == "not reproduced":
            _finish(report, as_json, 1)
    _finish(report, as_json, 0)


def _fail(report: dict[str, Any], as_json: bool, label: str, reason: str, code: int = 1) -> NoReturn:
    report["reason"] = reason
    if not as_json:
        click.echo(f"{label}: {safe(reason)}", err=True)
    _finish(report, as_json, code)


def _timestamp_line(v: Any) -> str:
    s = v.timestamp
    return f"preregistration timestamp: {safe(str(s.gen_time))} by {safe(str(s.tsa))} (RFC 3161, verified)" if s \
        else "preregistration timestamp: none"


def _print_outcome(outcome: Any) -> None:
    click.echo(f"reproduce: {outcome.verdict} ({outcome.n_artifacts} artifacts compared)")
    click.echo(f"  {safe(outcome.reason)}")
    for flip in outcome.flips[1:]:
        click.echo(f"  also flipped: {safe(flip)}")
    if outcome.differing:
        click.echo(f"  first differing artifact: {safe(outcome.first_difference)} ({len(outcome.differing)} differ)")
    t = outcome.tolerances
    click.echo(f"  tolerances: |new - old| <= {safe(t['atol'])} + {safe(t['rtol'])} * |old| on every gate figure"
               + (f"; worst: {safe(outcome.worst_figure)}" if outcome.worst_figure else ""))
    click.echo(f"  ran: {safe(outcome.code)}")


def _finish(report: dict[str, Any], as_json: bool, code: int) -> NoReturn:
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    sys.exit(code)


def _load_public_optional(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    return None if value is None else _load_public(ctx, param, value)


@archive.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the contents as JSON")
@click.option("--html", "html_out", type=click.Path(dir_okay=False),
              help="write the bundle's report page here instead: rendered from its records by this sasgate, "
                   "marked UNVERIFIED unless --key verified the bundle")
@click.option("--key", "public_key", type=click.Path(dir_okay=False), callback=_load_public_optional,
              help="with --html: verify the bundle with the signer's public key first")
@fails_cleanly
def show(file: str, as_json: bool, html_out: str | None, public_key: Any) -> None:
    """List what FILE holds WITHOUT verifying it (run `verify` before trusting any of it).

    Read under verify's limits; a malformed record (decision.json, bundle.json, the envelope)
    exits 1 naming the file and field. Every string from the bundle is escaped for the terminal.
    With --html OUT: write the report page of the bundle (decision, gates, claims, plots, the bundle's
    git commit and environment) as one self-contained HTML file, VERIFIED only when --key verified it.
    """
    from pydantic import ValidationError

    from sasgate.decision import validate_decision

    from . import bundle, dsse
    from .verify import read_bundle

    if public_key is not None and not html_out:
        raise click.UsageError("--key goes with --html (to check a bundle, run `sasgate archive verify`)")
    if html_out:
        from .show_html import write_html

        ctx = write_html(file, html_out, public_key)
        verdict = safe(ctx.verdict)  # bundle text: escaped for the terminal
        click.echo(f"wrote {html_out}: {'VERIFIED' if ctx.verified else 'UNVERIFIED'} ({verdict})")
        return
    c = read_bundle(file)
    try:
        decision = validate_decision(c.json("decision.json"), "decision.json") if "decision.json" in c.digests \
            else None
    except NotVerifiedError:
        raise
    except SasgateError as exc:  # malformed: exit 1 like every other unverifiable bundle
        raise NotVerifiedError(str(exc)) from None
    info = bundle.validate_bundle_info(c.json(bundle.BUNDLE_INFO), NotVerifiedError) \
        if bundle.BUNDLE_INFO in c.digests else None
    claimed: list[str] = []
    if bundle.ENVELOPE in c.digests:
        try:
            claimed = [s.keyid for s in dsse.Envelope.model_validate(c.json(bundle.ENVELOPE)).signatures]
        except ValidationError as exc:
            raise NotVerifiedError(f"{bundle.ENVELOPE}: not a DSSE envelope ({exc.errors()[0]['msg']})") from None
    if as_json:
        click.echo(json.dumps({"unverified": True, "bundle": file, "claimed_signers": claimed,
                               "files": [{"name": n, "size": c.sizes[n], "sha256": d} for n, d in c.digests.items()],
                               "decision": decision.to_json() if decision else None,
                               "bundle_info": c.json(bundle.BUNDLE_INFO) if info else None},
                              indent=2, sort_keys=True))
        return
    click.echo(f"UNVERIFIED contents of {safe(file)}: nothing below has been checked. "
               f"Run `sasgate archive verify {safe(file)} --key PUB` before trusting it.")
    click.echo(f"claimed signer key ids (unchecked): {', '.join(safe(k or '(none)') for k in claimed) or 'none'}")
    for line in _decision_lines(decision) if decision else ["decision.json: missing"]:
        click.echo(f"[unverified] {line}")
    if info:
        click.echo(f"[unverified] git commit: {safe(info.git.commit)} (dirty: {str(info.git.dirty).lower()})")
        click.echo(f"[unverified] {_large_line(info)}")
    click.echo(f"files ({len(c.digests)}, {sum(c.sizes.values())} bytes):")
    for name in c.digests:
        click.echo(f"  {c.sizes[name]:>12}  {safe(name)}")
