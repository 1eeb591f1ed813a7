"""Bundles carry report.html, and `sasgate archive show BUNDLE --html OUT` renders a received bundle's page.

On a private copy of the session's `reproduced_small` (tests/conftest.py), exported with a real Ed25519 key;
tampered bundles are re-written with the archive's own deterministic writer (the signed statement left as it
was), so they read like any received file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from browser import dump_dom
from projects import copy_project
from sasgate.archive import bundle, keys
from sasgate.archive.export import export
from sasgate.archive.safe_extract import iter_members
from sasgate.cli import main
from sasgate.plots import count_marks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(reproduced_small, tmp_path_factory) -> Path:
    return copy_project(reproduced_small, tmp_path_factory.mktemp("report_bundle") / "proj")


@pytest.fixture(scope="module")
def signer(tmp_path_factory) -> keys.KeyPair:
    return keys.generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundle_path(built, signer, tmp_path_factory) -> Path:
    return export(built, signer.private_path, tmp_path_factory.mktemp("out") / "result.tar.gz").out


@pytest.fixture(scope="module")
def members(bundle_path) -> dict[str, bytes]:
    return {m.name: m.stream.read() for m in iter_members(bundle_path)}


def show_html(bundle_file: Path, out: Path, *key: str):
    return CliRunner().invoke(main, ["archive", "show", str(bundle_file), "--html", str(out), *key])


def body(page: str) -> str:
    """The records part of a page: from the decision to the plots (the banner and provenance differ)."""
    return page[page.index('<section id="decision">'):page.index('<section id="provenance">')]


def rewritten(members: dict[str, bytes], tmp: Path, changes: dict[str, bytes]) -> Path:
    out = tmp / "tampered.tar.gz"
    files = {**members, **changes}
    bundle.write_bundle(out, [bundle.Entry(n, hashlib.sha256(d).hexdigest(), data=d) for n, d in files.items()])
    return out


def test_the_bundles_report_is_the_workspaces_byte_for_byte_and_signed(members, built):
    assert members["report.html"] == (built / "report.html").read_bytes()
    envelope = json.loads(members[bundle.ENVELOPE])
    subjects = {s["name"]: s["digest"]["sha256"] for s in json.loads(base64.b64decode(envelope["payload"]))["subject"]}
    assert subjects["report.html"] == hashlib.sha256(members["report.html"]).hexdigest()
    assert subjects["manifests/report.json"] == hashlib.sha256(members["manifests/report.json"]).hexdigest()


def test_show_html_without_a_key_is_unverified_and_shows_the_bundles_records(bundle_path, built, tmp_path):
    res = show_html(bundle_path, tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"wrote {tmp_path / 'r.html'}: UNVERIFIED (not verified (no --key given))")
    page = (tmp_path / "r.html").read_text()
    assert '<div class="banner unverified" id="verification">UNVERIFIED: result.tar.gz: not verified' in page
    assert body(page) == body((built / "report.html").read_text())
    assert "its report.html: byte for byte the rendering of its records here" in page
    info = json.loads((built / "decision.json").read_text())
    assert info["decision_state"] in page and "git commit (unverified)" in page and "environment (unverified)" in page


def test_show_html_with_the_signers_key_is_verified_and_opens_offline_with_its_charts(bundle_path, signer, tmp_path):
    res = show_html(bundle_path, tmp_path / "v.html", "--key", str(signer.public_path))
    assert res.exit_code == 0, res.output
    page = (tmp_path / "v.html").read_text()
    assert f'<div class="banner verified" id="verification">VERIFIED: result.tar.gz: signed by {signer.fingerprint}' \
        in page and "(unverified)" not in page
    dom = dump_dom(tmp_path / "v.html", wait_ms=1000)
    figures = re.findall(r'<figure class="chart[^"]*" id="(plot-\d+)"', dom)
    counts = count_marks(dom, figures)
    assert figures and all(n > 0 for n in counts.values()), counts  # every chart drew
    assert 'id="verification">VERIFIED' in dom


def test_show_html_with_another_key_says_not_verified(bundle_path, tmp_path):
    other = keys.generate(tmp_path / "other")
    res = show_html(bundle_path, tmp_path / "n.html", "--key", str(other.public_path))
    assert res.exit_code == 0, res.output
    page = (tmp_path / "n.html").read_text()
    assert '<div class="banner unverified" id="verification">UNVERIFIED: result.tar.gz: NOT VERIFIED: ' in page
    assert "signature" in page.split('id="verification">')[1].split("</div>")[0]


HOSTILE = '</td><script>alert(1)</script><img src=x onerror=alert(2)>\u202eDEIFIREV'


def test_a_tampered_bundle_is_rendered_from_its_records_with_every_string_escaped(members, signer, tmp_path):
    decision = json.loads(members["decision.json"])
    decision["claims"]["disallowed"][0]["text"] = HOSTILE
    decision["reopen_conditions"][0]["text"] = HOSTILE
    info = json.loads(members[bundle.BUNDLE_INFO])
    info["git"]["commit"] = HOSTILE
    evil = rewritten(members, tmp_path, {"decision.json": json.dumps(decision).encode(),
                                         "report.html": b"<html><script>document.write('VERIFIED')</script></html>",
                                         bundle.BUNDLE_INFO: json.dumps(info).encode()})
    for key in ([], ["--key", str(signer.public_path)]):
        res = show_html(evil, tmp_path / "t.html", *key)
        assert res.exit_code == 0, res.output
        page = (tmp_path / "t.html").read_text()
        assert "<script" not in page and "<img" not in page and "\u202e" not in page
        assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 2 and "\\u202eDEIFIREV" in page
        assert '<div class="banner unverified"' in page and 'class="banner verified"' not in page
        assert "its report.html: differs from the rendering of its records here" in page
    assert "NOT VERIFIED: _sasgate/bundle.json: sha256" in page and "differs from the signed" in page


@pytest.mark.parametrize("change, code, message", [
    ({"decision.json": b"[" * 100000 + b"]" * 100000}, 5, "decision.json: unreadable JSON"),
    ({"decision.json": b"[]"}, 5, "decision.json: expected a JSON object"),
    ({"dvc.yaml": b"a: &x [1]\nb: *x\n"}, 5, "dvc.yaml: YAML aliases are not supported here"),
])
def test_a_malformed_bundle_fails_with_one_message_and_writes_nothing(members, tmp_path, change, code, message):
    res = show_html(rewritten(members, tmp_path, change), tmp_path / "m.html")
    assert res.exit_code == code and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m.html").exists()


def test_show_html_refuses_what_is_not_a_bundle_and_a_key_without_html(bundle_path, signer, tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a bundle")
    res = show_html(junk, tmp_path / "j.html")
    assert res.exit_code == 1 and "truncated or corrupt archive" in res.output and not (tmp_path / "j.html").exists()
    res = CliRunner().invoke(main, ["archive", "show", str(bundle_path), "--key", str(signer.public_path)])
    assert res.exit_code == 2 and "--key goes with --html" in res.output
