"""An RFC 3161 trusted timestamp over the preregistration lock (ARCHITECTURE.md, "Preregistration").

`request` sends a TimeStampReq (SHA-256 of the lock file's bytes, a fresh nonce, the TSA's
certificate asked for) as an HTTP POST `application/timestamp-query` and checks the reply
against the request and the trusted certificate before anything is kept. `verify` checks a
stored reply offline: the PKI status is granted, the CMS signature verifies with the signing
certificate embedded in the token, that certificate chains to the trusted certificates (a PEM
file the user gives: the CA that issued the TSA's certificate, intermediates may follow) and
carries the critical timeStamping extended key usage, and the message imprint is the SHA-256 of the lock's
bytes. Any failure is a TimestampError (exit 12) naming it; nothing is trusted on first use.
Parsing and the signature checks are rfc3161-client's (Trail of Bits).
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from rfc3161_client import (HashAlgorithm, PKIStatus, TimestampRequestBuilder, TimeStampResponse, VerificationError,
                            VerifierBuilder, decode_timestamp_response)

from .errors import TimestampError

QUERY_TYPE = "application/timestamp-query"
SHA256_OID = x509.ObjectIdentifier("2.16.840.1.101.3.4.2.1")
TIMEOUT_S = 30
MAX_REPLY = 1 << 20


@dataclass(frozen=True)
class Stamp:
    """What a verified token says: when, by whom, over which digest."""

    gen_time: str  # ISO 8601, UTC, as the TSA signed it
    tsa: str  # the signing certificate's subject (RFC 4514)
    serial: int
    sha256: str  # the message imprint: sha256 (hex) of the lock file's bytes

    def to_json(self) -> dict[str, Any]:
        return {"gen_time": self.gen_time, "tsa": self.tsa, "serial": self.serial, "sha256": self.sha256}


def load_trusted(pem: bytes, origin: str) -> list[x509.Certificate]:
    """The trusted certificates of a PEM file (the TSA's CA, and intermediates); unreadable is an error."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TimestampError(f"{origin}: not a PEM certificate file ({exc})") from None
    return certs


def _decode(reply: bytes, origin: str) -> TimeStampResponse:
    try:
        return decode_timestamp_response(reply)
    except ValueError as exc:
        raise TimestampError(f"{origin}: not an RFC 3161 timestamp response ({exc})") from None


def _check(resp: TimeStampResponse, data: bytes, trusted: list[x509.Certificate], origin: str,
           nonce: int | None = None) -> Stamp:
    if resp.status != PKIStatus.GRANTED:
        raise TimestampError(f"{origin}: the TSA did not grant a timestamp (status {resp.status}: "
                             f"{'; '.join(resp.status_string) or 'no reason given'})")
    info = resp.tst_info
    want = hashlib.sha256(data).hexdigest()
    imprint = info.message_imprint
    if imprint.hash_algorithm != SHA256_OID:
        raise TimestampError(f"{origin}: the token's message imprint is not SHA-256 ({imprint.hash_algorithm.dotted_string})")
    got = imprint.message.hex()
    if got != want:
        raise TimestampError(f"{origin}: the token covers another digest (sha256 {got}), "
                             f"not this lock (sha256 {want})")
    builder = VerifierBuilder(nonce=nonce)
    for cert in trusted:
        builder = builder.add_root_certificate(cert)
    try:
        builder.build().verify(resp, imprint.message)
    except (VerificationError, ValueError) as exc:
        why = re.search(r'Verify error: ([^"]+)', str(exc))
        raise TimestampError(f"{origin}: the token does not verify against the trusted TSA certificate: "
                             f"{why.group(1) if why else exc}") from None
    signer = next((x509.load_der_x509_certificate(c) for c in resp.signed_data.certificates
                   if _is_signer(x509.load_der_x509_certificate(c), resp)), None)
    return Stamp(gen_time=info.gen_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                 tsa=signer.subject.rfc4514_string() if signer else "(unknown)", serial=info.serial_number, sha256=got)


def _is_signer(cert: x509.Certificate, resp: TimeStampResponse) -> bool:
    return any(cert.issuer == si.issuer and cert.serial_number == si.serial_number
               for si in resp.signed_data.signer_infos)


def verify(reply: bytes, data: bytes, trusted_pem: bytes, origin: str, trusted_origin: str) -> Stamp:
    """Offline check of a stored timestamp reply over `data` (the lock file's bytes)."""
    return _check(_decode(reply, origin), data, load_trusted(trusted_pem, trusted_origin), origin)


def request(url: str, data: bytes, trusted_pem: bytes, trusted_origin: str) -> tuple[bytes, Stamp]:
    """Ask the TSA at url for a token over sha256(data); the reply's bytes once it checks out."""
    trusted = load_trusted(trusted_pem, trusted_origin)
    req = TimestampRequestBuilder().data(data).hash_algorithm(HashAlgorithm.SHA256).nonce(nonce=True) \
        .cert_request(cert_request=True).build()
    http = urllib.request.Request(url, data=req.as_bytes(), method="POST", headers={"Content-Type": QUERY_TYPE})
    try:
        with urllib.request.urlopen(http, timeout=TIMEOUT_S) as resp:
            reply = resp.read(MAX_REPLY + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TimestampError(f"the TSA at {url} could not be reached: {exc}") from None
    if len(reply) > MAX_REPLY:
        raise TimestampError(f"the TSA at {url} sent more than {MAX_REPLY} bytes")
    stamp = _check(_decode(reply, f"the reply of {url}"), data, trusted, f"the reply of {url}", nonce=req.nonce)
    return reply, stamp
