"""DSSE envelopes over in-toto Statement v1, Ed25519-signed."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sasgate.archive import dsse
from sasgate.errors import NotVerifiedError

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
STATEMENT = dsse.make_statement({"b.json": "b" * 64, "a.txt": "a" * 64}, {"schema": "test", "decision": "hold"})


def test_pae_matches_the_dsse_spec_example():
    # https://github.com/secure-systems-lab/dsse/blob/master/protocol.md (test vector)
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_statement_is_in_toto_v1_with_sorted_subjects():
    assert STATEMENT["_type"] == "https://in-toto.io/Statement/v1"
    assert [s["name"] for s in STATEMENT["subject"]] == ["a.txt", "b.json"]
    assert STATEMENT["predicateType"] == dsse.PREDICATE_TYPE


def test_signing_is_deterministic_and_round_trips():
    env = dsse.sign(STATEMENT, KEY)
    assert env == dsse.sign(STATEMENT, KEY)
    statement, keyid = dsse.open_envelope(env, KEY.public_key(), "env")
    assert statement.digests() == {"a.txt": "a" * 64, "b.json": "b" * 64}
    assert keyid == json.loads(env)["signatures"][0]["keyid"]


def _mutate(env: bytes, fn) -> bytes:
    raw = json.loads(env)
    fn(raw)
    return json.dumps(raw).encode()


def _payload(raw: dict, change) -> None:
    st = json.loads(base64.b64decode(raw["payload"]))
    change(st)
    raw["payload"] = base64.b64encode(json.dumps(st).encode()).decode()


@pytest.mark.parametrize("mutation, message", [
    (lambda r: _payload(r, lambda s: s["subject"][0]["digest"].update(sha256="c" * 64)), "no signature verifies"),
    (lambda r: r.update(payloadType="application/json"), "payloadType"),
    (lambda r: r.update(signatures=[]), "not a DSSE envelope"),
    (lambda r: r["signatures"][0].update(sig="!!notbase64"), "not valid base64"),
    (lambda r: r.update(extra=1), "not a DSSE envelope"),
])
def test_tampered_envelopes_fail(mutation, message):
    env = _mutate(dsse.sign(STATEMENT, KEY), mutation)
    with pytest.raises(NotVerifiedError, match=message):
        dsse.open_envelope(env, KEY.public_key(), "env")


def test_another_keys_signature_fails_naming_both_keys():
    env = dsse.sign(STATEMENT, OTHER)
    with pytest.raises(NotVerifiedError, match="no signature verifies with the given key SHA256:.*signed by SHA256:"):
        dsse.open_envelope(env, KEY.public_key(), "env")


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(predicateType="https://slsa.dev/provenance/v1"), "predicate type"),
    (lambda s: s["subject"].append(dict(s["subject"][0])), "subject twice"),
    (lambda s: s["subject"][0].update(digest={"sha1": "0" * 40}), "not an in-toto statement"),
])
def test_validly_signed_but_malformed_statements_fail(change, message):
    st = json.loads(json.dumps(STATEMENT))
    change(st)
    with pytest.raises(NotVerifiedError, match=message):
        dsse.open_envelope(dsse.sign(st, KEY), KEY.public_key(), "env")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verifies_the_signature_over_pae(tmp_path):
    """Standard tooling: the signature is plain Ed25519 over PAE(payloadType, payload)."""
    env = json.loads(dsse.sign(STATEMENT, KEY))
    payload = base64.b64decode(env["payload"])
    (tmp_path / "pae.bin").write_bytes(dsse.pae(env["payloadType"], payload))
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(env["signatures"][0]["sig"]))
    (tmp_path / "pub.pem").write_bytes(KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-in", "pae.bin",
           "-sigfile", "sig.bin"]
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True).returncode == 0
    (tmp_path / "pae.bin").write_bytes(dsse.pae(env["payloadType"], payload + b" "))
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True).returncode != 0
