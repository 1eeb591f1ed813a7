"""DSSE envelopes around in-toto Statement v1, signed with Ed25519.

The signature covers PAE(payloadType, payload) exactly as the DSSE spec defines it
(https://github.com/secure-systems-lab/dsse/blob/master/protocol.md), so any DSSE
implementation, or five lines of Python with `cryptography` (README), can check it.
The payload is the statement as canonical JSON (sorted keys), and Ed25519 is
deterministic, so the same statement and key always give the same envelope bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sasgate.artifacts import canonical_json
from sasgate.errors import NotVerifiedError

from .keys import fingerprint

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://sasgate.dev/negative-result/v1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Subject(_Strict):
    name: str = Field(min_length=1)
    digest: dict[str, str]

    @field_validator("digest")
    @classmethod
    def _sha256(cls, v: dict[str, str]) -> dict[str, str]:
        if set(v) != {"sha256"} or not _HEX64.match(v["sha256"]):
            raise ValueError("digest must be exactly {'sha256': <64 lowercase hex>}")
        return v


class Statement(_Strict):
    """in-toto Statement v1 (https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md)."""

    type_: str = Field(alias="_type")
    subject: list[Subject] = Field(min_length=1)
    predicateType: str
    predicate: dict[str, Any]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def digests(self) -> dict[str, str]:
        return {s.name: s.digest["sha256"] for s in self.subject}


class Signature(_Strict):
    keyid: str = ""
    sig: str


class Envelope(_Strict):
    payloadType: str
    payload: str
    signatures: list[Signature] = Field(min_length=1)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: `DSSEv1 <len> <type> <len> <payload>`."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def make_statement(digests: dict[str, str], predicate: dict[str, Any]) -> dict[str, Any]:
    """Statement v1 whose subjects are the given {path: sha256}, in sorted order."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": d}} for n, d in sorted(digests.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def sign(statement: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The DSSE envelope (canonical JSON bytes) for the statement, signed with key."""
    payload = canonical_json(statement).encode("utf-8")
    sig = key.sign(pae(PAYLOAD_TYPE, payload))
    env = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode("ascii"),
           "signatures": [{"keyid": fingerprint(key.public_key()), "sig": base64.b64encode(sig).decode("ascii")}]}
    return canonical_json(env).encode("utf-8")


def _b64(text: str, what: str, origin: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise NotVerifiedError(f"{origin}: {what} is not valid base64") from None


def open_envelope(raw: bytes, key: Ed25519PublicKey, origin: str) -> tuple[Statement, str]:
    """Check the envelope's signature with key; return the statement and the signing key id.

    Fails closed: anything but a well-formed envelope holding one signature that verifies
    under `key` (whose keyid, when given, is that key's fingerprint) over a well-formed
    in-toto v1 statement with our predicate type raises.
    """
    try:
        env = Envelope.model_validate_json(raw)
    except ValidationError as exc:
        raise NotVerifiedError(f"{origin}: not a DSSE envelope ({exc.errors()[0]['msg']})") from None
    if env.payloadType != PAYLOAD_TYPE:
        raise NotVerifiedError(f"{origin}: payloadType is {env.payloadType!r}, expected {PAYLOAD_TYPE!r}")
    payload = _b64(env.payload, "payload", origin)
    message = pae(env.payloadType, payload)
    want = fingerprint(key)
    for s in env.signatures:
        try:
            key.verify(_b64(s.sig, "signature", origin), message)
        except InvalidSignature:
            continue
        if s.keyid and s.keyid != want:  # the hint is unsigned, but a wrong one is never what an honest signer wrote
            raise NotVerifiedError(f"{origin}: the signature verifies with the given key {want}, but its keyid "
                                   f"names {s.keyid!r}")
        break
    else:
        ids = ", ".join(s.keyid or "(no keyid)" for s in env.signatures)
        raise NotVerifiedError(f"{origin}: no signature verifies with the given key {want} (signed by {ids})")
    try:
        statement = Statement.model_validate(json.loads(payload))
    except (ValueError, ValidationError) as exc:
        raise NotVerifiedError(f"{origin}: the signed payload is not an in-toto statement ({exc})") from None
    if statement.type_ != STATEMENT_TYPE or statement.predicateType != PREDICATE_TYPE:
        raise NotVerifiedError(f"{origin}: statement type {statement.type_!r} / predicate type "
                               f"{statement.predicateType!r}, expected {STATEMENT_TYPE!r} / {PREDICATE_TYPE!r}")
    names = [s.name for s in statement.subject]
    if len(set(names)) != len(names):
        raise NotVerifiedError(f"{origin}: the statement lists a subject twice")
    return statement, want
