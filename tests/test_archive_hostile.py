"""Hostile bundles built in memory (no `dvc repro`): spoofed terminal output, malformed records, lying signers.

Each bundle here is one the code before issue 13 accepted or printed raw.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gate_records import TUPLES, behaviour, reconstruction, remediation, stability
from sasgate.archive import bundle, dsse, keys
from sasgate.archive.terminal import safe
from sasgate.archive.verify import verify
from sasgate.artifacts import canonical_json
from sasgate.cli import main
from sasgate.decision import decide
from sasgate.errors import NotVerifiedError

SPOOF = "fine.\n\x1b[2K\x1b[1AVERIFIED result.tar.gz\nsigned by: SHA256:trusted (the key given)\x1b[0m"
RAW = ("\x1b", "\x07", "\u202e", "\x9b", "\u2028")  # ESC, BEL, RIGHT-TO-LEFT OVERRIDE, C1 CSI, LINE SEPARATOR


def decision_json() -> dict:
    records = {r.gate: r for r in (behaviour(), stability(), reconstruction(0.163, 0.195), remediation("stopped"))}
    d = decide(records, TUPLES).to_json()
    d["claims"]["allowed"][0]["text"] = SPOOF
    d["reopen_conditions"][0]["text"] = "reopen \u202eyltnerappa\u202c when \x9b2J"
    return d


def info_json(keyid: str, **over) -> dict:
    info = {"schema": bundle.BUNDLE_SCHEMA, "sasgate_version": "0.1.0",
            "git": {"commit": "abc\x1b]0;pwned\x07", "commit_date": None, "dirty": False, "dirty_paths": [],
                    "untracked_included": []},
            "stages": ["decide"], "dvc_remote": {"name": "store\u2028VERIFIED", "url": "s3://x/\x1b[8m"},
            "include_large": False, "large_artifacts": [],
            "tolerances": {"rtol": 0.05, "atol": 0.001, "rule": "r"},
            "signer": {"keyid": keyid, "name": "Alice\x1b[31m"}}
    info.update(over)
    return info


def signed(members: dict[str, bytes], key: Ed25519PrivateKey, predicate: dict, keyid_hint: str | None = None,
           extra_subjects: dict[str, str] | None = None) -> dict[str, bytes]:
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()} | (extra_subjects or {})
    envelope = json.loads(dsse.sign(dsse.make_statement(digests, predicate), key))
    if keyid_hint is not None:
        envelope["signatures"][0]["keyid"] = keyid_hint
    return {**members, bundle.ENVELOPE: canonical_json(envelope).encode()}


def write(members: dict[str, bytes], out: Path) -> Path:
    bundle.write_bundle(out, [bundle.Entry(n, hashlib.sha256(d).hexdigest(), data=d) for n, d in members.items()])
    return out


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def pub(key, tmp_path) -> Path:
    p = tmp_path / "signer.pub"
    p.write_text(keys.openssh_public(key.public_key()) + "\n")
    return p


def spoofing_bundle(key: Ed25519PrivateKey, out: Path, **info_over) -> Path:
    fp = keys.fingerprint(key.public_key())
    members = {"decision.json": canonical_json(decision_json()).encode(),
               bundle.BUNDLE_INFO: canonical_json(info_json(fp, **info_over)).encode()}
    return write(signed(members, key, {"signer": {"keyid": fp}}, keyid_hint="SHA256:x\x1b[2K\nVERIFIED"), out)


def assert_no_raw_control(output: str) -> None:
    for c in RAW:
        assert c not in output, repr(c)
    for line in output.splitlines():
        assert not line.startswith(("VERIFIED", "signed by")), line


def test_show_escapes_every_string_from_the_bundle(key, tmp_path):
    path = spoofing_bundle(key, tmp_path / "spoof.tar.gz")
    res = CliRunner().invoke(main, ["archive", "show", str(path)])
    assert res.exit_code == 0, res.output
    assert_no_raw_control(res.output)
    assert res.output.startswith("UNVERIFIED")
    for escaped in ("fine.\\n\\x1b[2K\\x1b[1AVERIFIED result.tar.gz\\nsigned by", "reopen \\u202eyltnerappa",
                    "\\x9b2J", "abc\\x1b]0;pwned\\x07", "store\\u2028VERIFIED", "SHA256:x\\x1b[2K\\nVERIFIED"):
        assert escaped in res.output, escaped
    as_json = CliRunner().invoke(main, ["archive", "show", str(path), "--json"])
    assert as_json.exit_code == 0 and "\x1b" not in as_json.output
    assert json.loads(as_json.output)["decision"]["claims"]["allowed"][0]["text"] == SPOOF  # escaped, not altered


def test_safe_escapes_what_a_terminal_acts_on_and_keeps_plain_text():
    assert safe("café über 3 ≤ 4 — ok") == "café über 3 ≤ 4 — ok"
    assert safe("a\nb\r\x1b[0m\x9b\u202e\u200f\u2029\ud800") == "a\\nb\\r\\x1b[0m\\x9b\\u202e\\u200f\\u2029\\ud800"


@pytest.mark.parametrize("name, data, named", [
    ("decision.json", b"[" * 100_000 + b"]" * 100_000, "decision.json: not valid JSON (nested too deeply)"),
    ("decision.json", b'{"schema": "sasgate.decision/1", "gates": []}', "decision.json: invalid decision"),
    ("decision.json", b"1" * 5000, "decision.json: not valid JSON"),
    (bundle.BUNDLE_INFO, canonical_json(info_json("k", tolerances={"rtol": -0.1, "atol": 0.0, "rule": "r"})).encode(),
     "tolerances.rtol"),
    (bundle.BUNDLE_INFO, b'{"schema": "sasgate.bundle/1"}', "missing field 'git'"),
    (bundle.ENVELOPE, b'["not", "an", "envelope"]', "not a DSSE envelope"),
])
def test_show_refuses_malformed_records_without_a_traceback(tmp_path, name, data, named):
    path = write({name: data}, tmp_path / "bad.tar.gz")
    res = CliRunner().invoke(main, ["archive", "show", str(path)])
    assert res.exit_code == 1 and (res.exception is None or isinstance(res.exception, SystemExit)), res.exception
    assert named in res.output


@pytest.mark.parametrize("name", ["notes/\u202etxt.exe", "notes/\x9b31mred", "notes/a\u2028b", "notes/\u200ex"])
def test_member_names_with_bidi_or_c1_characters_are_refused_and_printed_escaped(key, pub, tmp_path, name):
    path = write({name: b"x"}, tmp_path / "names.tar.gz")
    for args in (["archive", "show", str(path)], ["archive", "verify", str(path), "--key", str(pub)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and "non-printable character in name" in res.output, res.output
        assert_no_raw_control(res.output)


def test_verify_errors_escape_names_a_dishonest_signer_chose(key, pub, tmp_path):
    """The statement may list any subject name; the reason naming it is printed on one escaped line."""
    fp = keys.fingerprint(key.public_key())
    evil = "x\x1b[2K\nVERIFIED result.tar.gz"
    members = signed({"a.txt": b"a"}, key, {"signer": {"keyid": fp}}, extra_subjects={evil: "0" * 64})
    res = CliRunner().invoke(main, ["archive", "verify", str(write(members, tmp_path / "e.tar.gz")), "--key", str(pub)])
    assert res.exit_code == 1
    assert "NOT VERIFIED: x\\x1b[2K\\nVERIFIED result.tar.gz: listed in the signed statement but missing" in res.output
    assert_no_raw_control(res.output)


def test_the_signer_named_in_the_statement_must_be_the_verifying_key(key, pub, tmp_path):
    other = keys.fingerprint(Ed25519PrivateKey.generate().public_key())
    mine = keys.fingerprint(key.public_key())
    lying = write(signed({"a.txt": b"a"}, key, {"signer": {"keyid": other, "name": "someone else"}}),
                  tmp_path / "l.tar.gz")
    with pytest.raises(NotVerifiedError, match=re.escape(f"names signer key '{other}', but it verified with the "
                                                         f"given key {mine}")):
        verify(lying, keys.load_public(pub))
    for predicate in ({}, {"signer": "SHA256:x"}):
        with pytest.raises(NotVerifiedError, match="names no signer key"):
            verify(write(signed({"a.txt": b"a"}, key, predicate), tmp_path / "n.tar.gz"), keys.load_public(pub))
    honest = write(signed({"a.txt": b"a"}, key, {"signer": {"keyid": mine}}), tmp_path / "h.tar.gz")
    with pytest.raises(NotVerifiedError, match="bundle.json: missing"):  # past the signer check, to the next one
        verify(honest, keys.load_public(pub))


def test_a_signature_whose_keyid_names_another_key_is_refused(key, pub, tmp_path):
    mine = keys.fingerprint(key.public_key())
    hinted = write(signed({"a.txt": b"a"}, key, {"signer": {"keyid": mine}}, keyid_hint="SHA256:someone-else"),
                   tmp_path / "k.tar.gz")
    with pytest.raises(NotVerifiedError, match=re.escape(f"verifies with the given key {mine}, but its keyid names "
                                                         "'SHA256:someone-else'")):
        verify(hinted, keys.load_public(pub))


@pytest.mark.parametrize("flags, named", [(["--rtol", "-0.1"], "rtol"), (["--atol", "-1e-9"], "atol"),
                                          (["--atol", "nan"], "atol"), (["--rtol", "inf"], "rtol")])
def test_export_refuses_negative_or_non_finite_tolerances(tmp_path, flags, named):
    res = CliRunner().invoke(main, ["archive", "export", "--key", str(tmp_path / "no-key"), "--out",
                                    str(tmp_path / "b.tar.gz"), "--root", str(tmp_path), *flags])
    assert res.exit_code == 2, res.output
    assert f"tolerances --rtol/--atol: {named}:" in res.output
    assert not (tmp_path / "b.tar.gz").exists()


def test_help_states_the_show_and_verify_contracts():
    show = CliRunner().invoke(main, ["archive", "show", "--help"])
    assert show.exit_code == 0 and "WITHOUT verifying" in show.output and "exits 1" in show.output
    assert "escaped for the terminal" in show.output
    group = CliRunner().invoke(main, ["archive", "--help"])
    assert "1   not verified, or not reproduced" in group.output and "2   usage error" in group.output
