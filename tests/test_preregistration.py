"""Preregistration in time (ARCHITECTURE.md, "Preregistration"): which results preceded the lock, said by
`decide`, `status` and the bundle's checks; and the RFC 3161 timestamp against a local TSA (tests/tsa.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gate_records import behaviour, reconstruction, remediation, stability
from sasgate.archive.verify import Contents, bundled_in_time, bundled_timestamp
from sasgate.decision import read_decision, render_claims_md
from sasgate.errors import PreregistrationError, TimestampError
from sasgate.gates import write_gate
from sasgate.params import parse_params
from sasgate.paths import Paths
from sasgate.preregistration import InTime, check_timestamp, in_time, preregister, read_in_time, timestamp_paths
from sasgate.stages import decide as decide_stage
from sasgate.status import exit_code, project_report
from tsa import Authority, make_authority, serve

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"tuples": [{"layer": 0, "site": "resid_pre", "sae": "train"},
                     {"layer": 1, "site": "resid_post", "sae": "train"}]}
MOVED = {**PARAMS, "reconstruction": {"threshold": 0.2}}


def sasgate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sasgate.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def paths(tmp_path) -> Paths:
    """A project with the shipped stop rules and no lock, no gate records yet."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    p = Paths.at(tmp_path)
    p.stop_rules.parent.mkdir()
    shutil.copy(REPO / "preregistration" / "stop_rules.yaml", p.stop_rules)
    return p


def write_results(paths: Paths, threshold: float = 0.12) -> None:
    """Gate records as a run gives them: nMSE 0.163 and 0.195 fail at 0.12 (stopped by K2), pass at 0.2."""
    recon = reconstruction(0.163, 0.195, threshold=threshold)
    rem = remediation("not_needed" if recon.status == "pass" else "stopped", "K2", threshold=threshold)
    for rec in (behaviour(), stability(), recon, rem):
        write_gate(paths.gate(rec.gate), rec)


def set_threshold(paths: Paths, threshold: float) -> None:
    (paths.root / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "reconstruction": {"threshold": threshold}}))


# --- which results preceded the lock ------------------------------------------------------------


def test_a_lock_made_before_any_result_reads_false(paths):
    lock = preregister(parse_params(PARAMS), paths, "before")
    facts = in_time(lock)
    assert facts.preregistered_after_results is False and facts.preceding_records == []
    assert facts.lock_sha256 == lock["sha256"]
    write_results(paths)  # results after the lock do not move it in time
    assert read_in_time(paths) == facts


def test_the_shipped_lock_reads_false_in_a_fresh_clone():
    """The committed lock was made before any result, whatever a clone's workspace holds later."""
    facts = read_in_time(Paths.at(REPO))
    assert facts is not None and facts.preregistered_after_results is False


def test_re_preregistering_after_results_names_every_record_that_preceded_it(paths):
    preregister(parse_params(PARAMS), paths, "before")
    write_results(paths)
    lock = preregister(parse_params(MOVED), paths, "move the threshold after seeing the nMSE")
    facts = in_time(lock)
    assert facts.preregistered_after_results is True
    assert [r.gate for r in facts.preceding_records] == ["behaviour", "stability", "reconstruction", "remediation"]
    recon = facts.preceding_records[2]
    assert recon.status == "fail" and recon.sha256 == hashlib.sha256(paths.gate("reconstruction").read_bytes()).hexdigest()
    assert lock["history"][-1]["made_after"] == lock["made_after"]  # each history entry keeps what preceded it
    assert lock["history"][0]["made_after"] == {}


def test_a_record_only_dvc_lock_remembers_still_preceded_it(paths):
    """Deleting the gate records before re-preregistering does not hide that their stage had run."""
    (paths.root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"reconstruction": {
        "cmd": "python -m sasgate.stages.reconstruction",
        "outs": [{"path": "gates/reconstruction.json", "md5": "0" * 32, "size": 10}]}}}))
    facts = in_time(preregister(parse_params(PARAMS), paths, "after a run whose records were removed"))
    assert facts.preregistered_after_results is True
    assert [(r.gate, r.sha256, r.in_dvc_lock) for r in facts.preceding_records] == [("reconstruction", None, True)]
    assert "listed in dvc.lock" in facts.text


def test_results_once_seen_stay_in_the_past(paths):
    """After an after-results lock, removing every trace and locking yet another protocol is still after them."""
    preregister(parse_params(PARAMS), paths, "before")
    write_results(paths)
    preregister(parse_params(MOVED), paths, "after")
    shutil.rmtree(paths.root / "gates")
    facts = in_time(preregister(parse_params({**PARAMS, "reconstruction": {"threshold": 0.3}}), paths, "clean slate?"))
    assert facts.preregistered_after_results is True and len(facts.preceding_records) == 4


def test_re_locking_the_same_protocol_after_results_keeps_its_place_in_time(paths):
    first = preregister(parse_params(PARAMS), paths, "before")
    write_results(paths)
    again = preregister(parse_params(PARAMS), paths, "same protocol, locked again")
    assert again["sha256"] == first["sha256"] and again["made_after"] != {}
    assert in_time(again).preregistered_after_results is False  # the protocol was fixed at the first entry


def test_a_legacy_lock_is_read_and_migrated(paths):
    """A lock written before history entries kept made_after (like the shipped one) reads its own field."""
    lock = preregister(parse_params(PARAMS), paths, "before")
    legacy = {**lock, "history": [{k: v for k, v in h.items() if k != "made_after"} for h in lock["history"]]}
    paths.preregistration_lock.write_text(json.dumps(legacy))
    assert in_time(legacy).preregistered_after_results is False
    write_results(paths)
    moved = preregister(parse_params(MOVED), paths, "after")
    assert moved["history"][0]["made_after"] == {} and in_time(moved).preregistered_after_results is True


@pytest.mark.parametrize("edit, named", [
    (lambda lock: lock.update(made_after={}), "made_after differs from its last history entry"),
    (lambda lock: lock["history"][0].pop("made_after"), "history entry 1 does not record which gate records"),
    (lambda lock: lock["history"][-1]["made_after"].update(reconstruction={"sha256": 3}), "invalid made_after"),
    (lambda lock: lock["history"][0]["made_after"].update(behaviour={"in_dvc_lock": False}), "needs its sha256"),
    (lambda lock: lock.update(sha256="f" * 64), "is not in its own history"),
    (lambda lock: lock.update(history="none"), "not a sasgate.preregistration/1 lock"),
])
def test_a_hand_edited_lock_is_refused_naming_it(paths, edit, named):
    preregister(parse_params(PARAMS), paths, "before")
    write_results(paths)
    lock = preregister(parse_params(MOVED), paths, "after")
    edit(lock)
    with pytest.raises(PreregistrationError, match=named):
        in_time(lock)


def test_the_flag_must_follow_from_the_records():
    with pytest.raises(ValueError, match="exactly when records preceded"):
        InTime(lock_sha256="a" * 64, preregistered_after_results=True, preceding_records=[])


# --- decide, CLAIMS.md and status say it ---------------------------------------------------------


def test_decide_refuses_without_a_lock(paths):
    write_results(paths)
    with pytest.raises(PreregistrationError, match="no preregistration at preregistration/lock.json"):
        decide_stage.run(parse_params(PARAMS), paths)
    assert not paths.decision.exists() and not paths.claims_md.exists()


def test_decision_claims_and_status_on_both_sides_of_the_results(paths):
    preregister(parse_params(PARAMS), paths, "before")
    write_results(paths)
    decide_stage.run(parse_params(PARAMS), paths)
    d = read_decision(paths.decision)
    assert d.preregistration is not None and d.preregistration.preregistered_after_results is False
    md = paths.claims_md.read_text()
    assert "preregistered before results" in md and "preregistered after results" not in md
    report = project_report(parse_params(PARAMS), paths)  # not a DVC project: only status's output checks flag
    assert [p for p in report["problems"] if "preregist" in p or "decision" in p] == []
    assert "preregistered before results" in sasgate("status", cwd=paths.root).stdout

    set_threshold(paths, 0.2)
    preregister(parse_params(MOVED), paths, "move the threshold after seeing the nMSE")
    res = sasgate("status", cwd=paths.root)
    assert res.returncode == 1
    assert "problem: preregistration: preregistered after results" in res.stdout
    assert "gates/reconstruction.json (fail, sha256" in res.stdout
    assert "decision.json no longer follows" in res.stdout  # the decision on disk still says "before"

    write_results(paths, threshold=0.2)  # the re-run under the moved threshold
    decide_stage.run(parse_params(MOVED), paths)
    d = read_decision(paths.decision)
    assert d.decision_state == "advance" and d.preregistration.preregistered_after_results is True
    assert [r.gate for r in d.preregistration.preceding_records] == ["behaviour", "stability", "reconstruction",
                                                                     "remediation"]
    md = paths.claims_md.read_text()
    assert "**preregistered after results**" in md and "gates/reconstruction.json (fail, sha256" in md
    assert md == render_claims_md(d)
    report = project_report(parse_params(MOVED), paths)
    flagged = [p for p in report["problems"] if "preregist" in p or "decision" in p]
    assert len(flagged) == 1 and "preregistered after results" in flagged[0]
    assert exit_code(report) == 1


def test_generated_claims_md_passes_the_overclaim_guard_either_way(paths):
    preregister(parse_params(PARAMS), paths, "before")
    write_results(paths)
    preregister(parse_params(MOVED), paths, "after")
    set_threshold(paths, 0.2)
    write_results(paths, threshold=0.2)
    decide_stage.run(parse_params(MOVED), paths)
    res = sasgate("claims", "lint", "CLAIMS.md", cwd=paths.root)
    assert res.returncode == 0, res.stdout + res.stderr


def test_help_names_the_timestamp_options_and_exit_12():
    from click.testing import CliRunner

    from sasgate.cli import main

    run = CliRunner()
    assert "12 a preregistration timestamp that does not verify" in run.invoke(main, ["--help"]).output
    assert "12  the bundled preregistration timestamp does not verify" in run.invoke(main, ["archive", "--help"]).output
    for args, option in ((["preregister"], "--tsa-cert"), (["preregister"], "--tsa URL"), (["status"], "--tsa-cert"),
                         (["archive", "verify"], "--tsa-cert")):
        res = run.invoke(main, [*args, "--help"])
        assert res.exit_code == 0 and option in res.output, args


# --- the RFC 3161 timestamp against a local TSA ----------------------------------------------------


@pytest.fixture(scope="module")
def authority(tmp_path_factory) -> Authority:
    return make_authority(tmp_path_factory.mktemp("tsa"))


@pytest.fixture(scope="module")
def other_authority(tmp_path_factory) -> Authority:
    return make_authority(tmp_path_factory.mktemp("tsa2"), "another TSA")


@pytest.fixture(scope="module")
def tsa_url(authority):
    with serve(authority) as url:
        yield url


def stamped(paths: Paths, authority: Authority, url: str) -> subprocess.CompletedProcess:
    res = sasgate("preregister", "--reason", "before, timestamped", "--tsa", url, "--tsa-cert", str(authority.ca_pem),
                  cwd=paths.root)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_the_timestamp_round_trips(paths, authority, tsa_url):
    res = stamped(paths, authority, tsa_url)
    assert "timestamp: 20" in res.stdout and "by CN=sasgate test TSA" in res.stdout
    token, cert = timestamp_paths(paths)
    assert cert.read_bytes() == authority.ca_pem.read_bytes()
    stamp = check_timestamp(paths)
    assert stamp.sha256 == hashlib.sha256(paths.preregistration_lock.read_bytes()).hexdigest()
    # the stored reply is a standard RFC 3161 response: OpenSSL verifies it against the lock's bytes too
    ossl = subprocess.run(["openssl", "ts", "-verify", "-data", str(paths.preregistration_lock), "-in", str(token),
                           "-CAfile", str(authority.ca_pem)], capture_output=True, text=True)
    assert ossl.returncode == 0 and "Verification: OK" in ossl.stdout, ossl.stderr
    res = sasgate("status", "--json", cwd=paths.root)
    ts = json.loads(res.stdout)["preregistration"]["timestamp"]
    assert ts["ok"] is True and ts["stamp"]["sha256"] == stamp.sha256 and ts["stamp"]["tsa"] == "CN=sasgate test TSA"


def test_a_token_over_another_digest_is_refused(paths, authority, tsa_url):
    stamped(paths, authority, tsa_url)
    token, _ = timestamp_paths(paths)
    old = token.read_bytes()
    preregister(parse_params(PARAMS), paths, "locked again without a timestamp")  # other lock bytes
    assert not token.exists()  # the stale token goes with the lock it covered
    token.write_bytes(old)
    (paths.root / "preregistration" / "tsa.pem").write_bytes(authority.ca_pem.read_bytes())
    res = sasgate("status", cwd=paths.root)
    assert res.returncode == 12, res.stdout + res.stderr
    assert "timestamp: BAD: preregistration/timestamp.tsr: the token covers another digest" in res.stdout
    with pytest.raises(TimestampError, match="covers another digest"):
        check_timestamp(paths)


def test_a_lock_edited_after_it_was_timestamped_is_refused(paths, authority, tsa_url):
    stamped(paths, authority, tsa_url)
    lock = json.loads(paths.preregistration_lock.read_text())
    lock["made_after"] = lock["history"][-1]["made_after"] = {}  # consistent, but not the stamped bytes
    lock["git_commit"] = "0" * 40
    paths.preregistration_lock.write_text(json.dumps(lock, sort_keys=True, indent=2) + "\n")
    assert sasgate("status", cwd=paths.root).returncode == 12


def test_a_token_checked_against_the_wrong_certificate_is_refused(paths, authority, other_authority, tsa_url):
    stamped(paths, authority, tsa_url)
    res = sasgate("status", "--tsa-cert", str(other_authority.ca_pem), cwd=paths.root)
    assert res.returncode == 12
    assert "does not verify against the trusted TSA certificate: unable to get local issuer certificate" in res.stdout
    with pytest.raises(TimestampError):
        check_timestamp(paths, other_authority.ca_pem)
    assert check_timestamp(paths, authority.ca_pem) is not None  # the right one still verifies


@pytest.mark.parametrize("token, cert, named", [
    (b"not DER", None, "not an RFC 3161 timestamp response"),
    (None, b"not a certificate", "not a PEM certificate file"),
    (None, "missing", "has no trusted TSA certificate"),
])
def test_a_malformed_token_or_certificate_is_refused(paths, authority, tsa_url, token, cert, named):
    stamped(paths, authority, tsa_url)
    token_path, cert_path = timestamp_paths(paths)
    if token is not None:
        token_path.write_bytes(token)
    if cert == "missing":
        cert_path.unlink()
    elif cert is not None:
        cert_path.write_bytes(cert)
    res = sasgate("status", cwd=paths.root)
    assert res.returncode == 12 and named in res.stdout


def test_preregister_writes_nothing_when_the_tsa_fails_or_its_reply_does_not_verify(paths, authority,
                                                                                    other_authority, tsa_url):
    preregister(parse_params(PARAMS), paths, "before")
    before = paths.preregistration_lock.read_bytes()
    for args, named in [
        (["--tsa", tsa_url, "--tsa-cert", str(other_authority.ca_pem)], "does not verify against the trusted"),
        (["--tsa", "http://127.0.0.1:9/tsa", "--tsa-cert", str(authority.ca_pem)], "could not be reached"),
        (["--tsa", tsa_url], "needs both the TSA's URL (--tsa) and its trusted certificate"),
    ]:
        res = sasgate("preregister", "--reason", "again", *args, cwd=paths.root)
        assert res.returncode == 12 and named in res.stderr, res.stderr
        assert paths.preregistration_lock.read_bytes() == before
        assert not any(p.exists() for p in timestamp_paths(paths))


# --- the bundle's checks (archive verify), on the bundled files ----------------------------------


def contents(paths: Paths) -> Contents:
    files = {p.relative_to(paths.root).as_posix(): p.read_bytes()
             for p in (paths.preregistration_lock, *timestamp_paths(paths)) if p.is_file()}
    return Contents(Path("bundle.tar.gz"), {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
                    {n: len(d) for n, d in files.items()}, files)


def test_the_bundle_checks_derive_in_time_and_verify_the_timestamp(paths, authority, other_authority, tsa_url):
    preregister(parse_params(PARAMS), paths, "before")
    write_results(paths)
    set_threshold(paths, 0.2)  # `sasgate preregister` reads params.yaml: another protocol, after the results
    stamped(paths, authority, tsa_url)
    c = contents(paths)
    assert bundled_in_time(c) == read_in_time(paths) and bundled_in_time(c).preregistered_after_results is True
    stamp = bundled_timestamp(c, None)
    assert stamp.sha256 == c.digests["preregistration/lock.json"]
    assert bundled_timestamp(c, authority.ca_pem.read_bytes()) == stamp  # the recipient's own trust anchor
    with pytest.raises(TimestampError, match="does not verify"):
        bundled_timestamp(c, other_authority.ca_pem.read_bytes())
    c.data.pop("preregistration/tsa.pem")
    with pytest.raises(TimestampError, match="tsa.pem is missing from the bundle"):
        bundled_timestamp(c, None)
    c.data["preregistration/lock.json"] = c.data["preregistration/lock.json"].replace(b'"made_after"', b'"made_after" ')
    with pytest.raises(TimestampError, match="covers another digest"):
        bundled_timestamp(c, authority.ca_pem.read_bytes())
    assert bundled_in_time(Contents(Path("b"), {}, {}, {})) is None  # no lock: the decision must not state one
    broken = contents(paths)
    broken.data["preregistration/lock.json"] = b'{"schema": "sasgate.preregistration/1"}'
    with pytest.raises(PreregistrationError):
        bundled_in_time(broken)


# --- end to end: re-preregistering after `dvc repro` on the shared SMALL project ----------------


@pytest.mark.slow
def test_re_preregistering_after_dvc_repro_is_said_by_status_decision_claims_and_the_bundle(
        reproduced_small, tmp_path, authority, other_authority, tsa_url):
    from click.testing import CliRunner

    from projects import copy_project, dvc
    from sasgate.archive import dsse, keys
    from sasgate.archive.safe_extract import iter_members
    from sasgate.cli import main
    from test_archive_e2e import rebuild

    root = copy_project(reproduced_small, tmp_path / "p")
    before = json.loads((root / "decision.json").read_text())
    assert before["preregistration"]["preregistered_after_results"] is False  # make_project preregisters first
    assert sasgate("status", cwd=root).returncode == 0

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["reconstruction"]["threshold"] = 10.0  # the goalposts, moved after seeing the nMSE
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    res = sasgate("preregister", "--reason", "raise the threshold", "--tsa", tsa_url,
                  "--tsa-cert", str(authority.ca_pem), cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "preregistered after results" in res.stdout and "timestamp: 20" in res.stdout
    res = sasgate("status", cwd=root)
    assert res.returncode == 1
    assert "problem: preregistration: preregistered after results" in res.stdout
    assert "gates/reconstruction.json (fail, sha256" in res.stdout

    res = dvc(root, "repro")
    ran = [line.split("'")[1] for line in res.stdout.splitlines() if line.startswith("Running stage '")]
    assert ran == ["params", "reconstruction", "remediation", "decide", "report"]
    d = json.loads((root / "decision.json").read_text())
    assert d["decision_state"] == "advance"
    p = d["preregistration"]
    assert p["preregistered_after_results"] is True
    assert [r["gate"] for r in p["preceding_records"]] == ["behaviour", "stability", "reconstruction", "remediation"]
    recon = next(r for r in p["preceding_records"] if r["gate"] == "reconstruction")
    assert recon["status"] == "fail" and recon["sha256"] == before["gates"]["reconstruction"]["sha256"]
    assert "**preregistered after results**" in (root / "CLAIMS.md").read_text()
    res = sasgate("status", cwd=root)
    assert res.returncode == 1 and "problem: preregistration: preregistered after results" in res.stdout
    assert res.stdout.count("problem:") == 1  # the decision itself is consistent now: only the timing is flagged

    kp = keys.generate(tmp_path / "keys")
    out = tmp_path / "result.tar.gz"
    res = CliRunner().invoke(main, ["archive", "export", "--key", str(kp.private_path), "--out", str(out),
                                    "--root", str(root)])
    assert res.exit_code == 0, res.output
    members = {m.name: m.stream.read() for m in iter_members(out)}
    assert {"preregistration/timestamp.tsr", "preregistration/tsa.pem"} <= set(members)
    statement, _ = dsse.open_envelope(members["_sasgate/statement.dsse.json"], keys.load_public(kp.public_path), "env")
    assert statement.predicate["preregistration"] == p

    res = CliRunner().invoke(main, ["archive", "verify", str(out), "--key", str(kp.public_path),
                                    "--tsa-cert", str(authority.ca_pem)])
    assert res.exit_code == 0, res.output
    assert "preregistration: preregistered after results" in res.output
    assert "preregistration timestamp: 20" in res.output and "by CN=sasgate test TSA (RFC 3161, verified)" in res.output
    res = CliRunner().invoke(main, ["archive", "verify", str(out), "--key", str(kp.public_path),
                                    "--tsa-cert", str(other_authority.ca_pem)])
    assert res.exit_code == 12 and "does not verify against the trusted TSA certificate" in res.output

    key = keys.load_private(kp.private_path)
    # a dishonest signer says "before results" in decision.json and CLAIMS.md and re-signs: not what the lock says
    claimed = {**d, "preregistration": {**p, "preregistered_after_results": False, "preceding_records": []}}
    from sasgate.decision import render_claims_md, validate_decision

    edited = {**members, "decision.json": (json.dumps(claimed, sort_keys=True, indent=2) + "\n").encode(),
              "CLAIMS.md": render_claims_md(validate_decision(claimed)).encode()}
    res = CliRunner().invoke(main, ["archive", "verify", str(rebuild(edited, tmp_path / "d.tar.gz", key)),
                                    "--key", str(kp.public_path)])
    assert res.exit_code == 1 and "decision.json does not follow from the gate records: preregistration" in res.output
    # a timestamp over another lock, re-signed: refused with exit 12
    other_lock = members["preregistration/lock.json"].replace(b'"raise the threshold"', b'"raise it"')
    _, cert = timestamp_paths(Paths.at(root))
    from sasgate import timestamp

    reply, _ = timestamp.request(tsa_url, other_lock, cert.read_bytes(), "ca")
    swapped = rebuild({**members, "preregistration/timestamp.tsr": reply}, tmp_path / "t.tar.gz", key)
    res = CliRunner().invoke(main, ["archive", "verify", str(swapped), "--key", str(kp.public_path)])
    assert res.exit_code == 12 and "preregistration/timestamp.tsr: the token covers another digest" in res.output
