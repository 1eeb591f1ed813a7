"""`sasgate archive verify`: fail-closed checking of a received bundle against a public key.

In order, stopping at the first failure (NotVerifiedError naming the file):
1. the archive is read member by member through `safe_extract` (hostile input and
   non-POSIX tar headers are rejected before use); with an extraction target, members
   are written only into a private temp folder (mkdtemp, 0700) in the target's nearest
   existing ancestor, which becomes the target only after every check passed and is
   removed otherwise, so a rejected bundle leaves the target absent or empty;
2. the DSSE envelope's Ed25519 signature verifies with the given public key, and the
   signer key id the signed statement names is that key's;
3. every file the signed statement lists is present with its sha256, and no file is
   present that the statement does not list;
4. bundle.json is a well-formed record (typed; tolerances finite and non-negative);
5. the decision and the claims follow from the gate records through the same state
   machine (`sasgate.decision.decide` on the bundled gate records and params;
   `render_claims_md` of that decision must equal CLAIMS.md byte for byte);
6. the signed predicate equals the summary rebuilt from decision.json and bundle.json,
   and the (typed) manifests and gate records agree with the bundle's sha256 of every
   artifact.

The decision's `preregistration` (whether the lock preceded the results) is re-derived from the
bundled preregistration/lock.json with the decision; a bundled RFC 3161 timestamp over the lock is
verified offline after the subject digests (`bundled_timestamp`; TimestampError, exit 12, when it fails).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sasgate.artifacts import DuplicateKeyError, parse_yaml, validate_manifest
from sasgate.claims import GATES
from sasgate.decision import Decision, decide, record_sha256, render_claims_md, validate_decision
from sasgate.errors import NotVerifiedError, SasgateError, TimestampError
from sasgate.gates import GateRecord, validate_gate
from sasgate.params import Params, parse_params
from sasgate.preregistration import InTime, in_time
from sasgate.status import required_tuples
from sasgate.timestamp import Stamp, verify as verify_timestamp

from . import bundle, dsse
from .export import predicate_for
from .safe_extract import CHUNK, Limits, iter_members, open_target

KEEP_MAX = 16 << 20  # members up to this size are kept in memory for the content checks
KEEP_TOTAL = 512 << 20


@dataclass
class Contents:
    """What one pass over the archive saw: every member's sha256 and size, small members' bytes."""

    path: Path
    digests: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    data: dict[str, bytes] = field(default_factory=dict)

    def text(self, name: str) -> str:
        if name not in self.data:
            why = "missing" if name not in self.digests else "too large to read"
            raise NotVerifiedError(f"{name}: {why} in {self.path.name}")
        try:
            return self.data[name].decode("utf-8")
        except UnicodeDecodeError:
            raise NotVerifiedError(f"{name}: not UTF-8 text") from None

    def json(self, name: str) -> Any:
        """A member parsed as JSON under the one set of parsing limits `verify` and `show` share."""
        try:
            return json.loads(self.text(name))
        except RecursionError:
            raise NotVerifiedError(f"{name}: not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # JSONDecodeError, or an integer over Python's digit limit
            raise NotVerifiedError(f"{name}: not valid JSON ({exc})") from None


def read_bundle(path: str | os.PathLike, limits: Limits = Limits(), extract_to: Path | None = None) -> Contents:
    """One pass: hash every member, keep the small ones, optionally write each below extract_to."""
    contents = Contents(Path(path))
    kept = 0
    for m in iter_members(path, limits):
        h, keep = hashlib.sha256(), m.size <= KEEP_MAX and kept + m.size <= KEEP_TOTAL
        chunks: list[bytes] = []
        with open_target(extract_to, m.name) if extract_to else contextlib.nullcontext() as out:
            while chunk := m.stream.read(CHUNK):
                h.update(chunk)
                if keep:
                    chunks.append(chunk)
                if out is not None:
                    out.write(chunk)
        contents.digests[m.name] = h.hexdigest()
        contents.sizes[m.name] = m.size
        if keep:
            contents.data[m.name] = b"".join(chunks)
            kept += m.size
    return contents


@dataclass(frozen=True)
class Verified:
    """A bundle that passed every check, and what it says."""

    contents: Contents
    keyid: str
    statement: dsse.Statement
    decision: Decision
    info: dict[str, Any]
    checks: tuple[str, ...]
    timestamp: Stamp | None = None  # the bundled preregistration timestamp, verified

    @property
    def signer_name(self) -> str | None:
        return self.info.get("signer", {}).get("name")


def verify(path: str | os.PathLike, key: Ed25519PublicKey, limits: Limits = Limits(),
           extract_to: Path | None = None, tsa_cert: bytes | None = None) -> Verified:
    """Every check of the module docstring; raises NotVerifiedError with the first failure.

    With extract_to (which must not exist yet), the bundle's tree appears there only once it verified.
    """
    if extract_to is None:
        return _verify(read_bundle(path, limits), key, tsa_cert)
    extract_to = Path(extract_to).absolute()
    if extract_to.exists():
        raise ValueError(f"{extract_to} already exists")
    staging = Path(tempfile.mkdtemp(prefix=".sasgate-verify-", dir=_nearest_existing(extract_to)))
    try:
        verified = _verify(read_bundle(path, limits, staging), key, tsa_cert)
        extract_to.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, extract_to)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return verified


def _nearest_existing(path: Path) -> Path:
    """The closest ancestor of path that exists: the staging folder goes there, on the target's filesystem."""
    return next(p for p in path.parents if p.is_dir())


def check_signer(statement: dsse.Statement, keyid: str) -> None:
    """The signer the signed statement names must be the key it verified with."""
    signer = statement.predicate.get("signer")
    named = signer.get("keyid") if isinstance(signer, dict) else None
    if named != keyid:
        what = f"signer key {_short(named)}" if isinstance(named, str) else "no signer key"
        raise NotVerifiedError(f"{bundle.ENVELOPE}: the signed statement names {what}, but it verified with the "
                               f"given key {keyid}")


def _verify(contents: Contents, key: Ed25519PublicKey, tsa_cert: bytes | None) -> Verified:
    if bundle.ENVELOPE not in contents.digests:
        raise NotVerifiedError(f"{bundle.ENVELOPE}: missing: not a sasgate bundle, or its signature was removed")
    statement, keyid = dsse.open_envelope(contents.data.get(bundle.ENVELOPE, b""), key, bundle.ENVELOPE)
    check_signer(statement, keyid)
    check_subjects(statement.digests(), {n: d for n, d in contents.digests.items() if n != bundle.ENVELOPE})
    stamp = bundled_timestamp(contents, tsa_cert)
    info = contents.json(bundle.BUNDLE_INFO)
    bundle.validate_bundle_info(info, NotVerifiedError)
    decision = check_decision(contents)
    if statement.predicate != predicate_for(contents.json("decision.json"), info):
        raise NotVerifiedError(f"{bundle.ENVELOPE}: the signed predicate does not match decision.json and "
                               f"{bundle.BUNDLE_INFO}")
    check_artifact_digests(contents, info)
    checks = ("signature", "signer key id", f"{len(statement.subject)} subject digests", "no unlisted files",
              "decision and claims re-derived", "manifests and gate inputs") + (("preregistration timestamp",) * bool(stamp))
    return Verified(contents, keyid, statement, decision, info, checks, stamp)


def check_subjects(listed: dict[str, str], present: dict[str, str]) -> None:
    for name in sorted(set(listed) | set(present)):
        if name not in present:
            raise NotVerifiedError(f"{name}: listed in the signed statement but missing from the bundle")
        if name not in listed:
            raise NotVerifiedError(f"{name}: present in the bundle but not listed in the signed statement")
        if listed[name] != present[name]:
            raise NotVerifiedError(f"{name}: sha256 {present[name]} differs from the signed {listed[name]}")


def bundled_params(contents: Contents) -> Params:
    try:
        return parse_params(parse_yaml(contents.text("params.yaml")), origin="params.yaml")
    except DuplicateKeyError as exc:
        raise NotVerifiedError(f"params.yaml: {exc}") from None
    except yaml.YAMLError as exc:
        raise NotVerifiedError(f"params.yaml: not valid YAML ({exc})") from None
    except SasgateError as exc:
        raise NotVerifiedError(str(exc)) from None


def gate_records(contents: Contents) -> dict[str, GateRecord]:
    """The bundled gate records, validated and in the canonical form their sha256 in decision.json refers to."""
    records: dict[str, GateRecord] = {}
    for gate in GATES:
        name = f"gates/{gate}.json"
        if name in contents.digests:
            try:
                records[gate] = validate_gate(contents.json(name), origin=name)
            except SasgateError as exc:
                raise NotVerifiedError(str(exc)) from None
            if record_sha256(records[gate]) != contents.digests[name]:
                raise NotVerifiedError(f"{name}: not in canonical form (edited by hand?)")
    return records


def check_decision(contents: Contents) -> Decision:
    """decision.json and CLAIMS.md must be exactly what the state machine makes of the gate records."""
    try:
        stated = validate_decision(contents.json("decision.json"), origin="decision.json")
        derived = decide(gate_records(contents), required_tuples(bundled_params(contents)),
                         preregistration=bundled_in_time(contents))
    except NotVerifiedError:
        raise
    except SasgateError as exc:
        raise NotVerifiedError(f"decision.json: {exc}") from None
    got, want = stated.to_json(), derived.to_json()
    for k in sorted(set(got) | set(want)):
        if got.get(k) != want.get(k):
            raise NotVerifiedError(f"decision.json does not follow from the gate records: {k} is "
                                   f"{_short(got.get(k))} in the bundle, the state machine gives {_short(want.get(k))}")
    claims, rendered = contents.text("CLAIMS.md").splitlines(), render_claims_md(derived).splitlines()
    for i, (a, b) in enumerate(zip_longest(claims, rendered, fillvalue="(end of file)"), 1):
        if a != b:
            raise NotVerifiedError(f"CLAIMS.md does not follow from the gate records (line {i}: {_short(a)}; "
                                   f"the state machine renders {_short(b)})")
    if contents.text("CLAIMS.md") != render_claims_md(derived):
        raise NotVerifiedError("CLAIMS.md does not follow from the gate records (whitespace or line endings differ)")
    return derived


LOCK, TOKEN, TSA_CERT = "preregistration/lock.json", "preregistration/timestamp.tsr", "preregistration/tsa.pem"


def bundled_in_time(contents: Contents) -> InTime | None:
    """Whether the bundled lock preceded the results, from the lock alone (None: the bundle has no lock)."""
    return in_time(contents.json(LOCK), LOCK) if LOCK in contents.digests else None


def bundled_timestamp(contents: Contents, tsa_cert: bytes | None) -> Stamp | None:
    """The bundled timestamp over the bundled lock, verified against tsa_cert or else the bundled
    preregistration/tsa.pem; None when the bundle has no timestamp."""
    if TOKEN not in contents.digests:
        return None
    if tsa_cert is None and TSA_CERT not in contents.data:
        raise TimestampError(f"{TOKEN}: no trusted TSA certificate to check it against ({TSA_CERT} is missing "
                             "from the bundle; give one with --tsa-cert)")
    anchor = tsa_cert if tsa_cert is not None else contents.data[TSA_CERT]
    return verify_timestamp(contents.data.get(TOKEN, b""), contents.data.get(LOCK, b""), anchor, TOKEN,
                            "--tsa-cert" if tsa_cert is not None else TSA_CERT)


def _short(v: Any, n: int = 160) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return repr(s if len(s) <= n else s[: n - 3] + "...")


def artifact_digests(contents: Contents, info: dict[str, Any]) -> dict[str, str]:
    """sha256 of every artifact the bundle holds or lists (listed large artifacts included)."""
    known = {a["path"]: a["sha256"] for a in info.get("large_artifacts", [])}
    for a in info.get("large_artifacts", []):
        if a.get("included") and contents.digests.get(a["path"]) != a["sha256"]:
            raise NotVerifiedError(f"{a['path']}: {bundle.BUNDLE_INFO} says it is included with sha256 "
                                   f"{a['sha256']}, the bundle disagrees")
    return {**known, **contents.digests}


def check_artifact_digests(contents: Contents, info: dict[str, Any]) -> None:
    """Manifests and gate records name artifacts by sha256: those must agree with the bundle."""
    known = artifact_digests(contents, info)
    for name in sorted(n for n in contents.digests if n.startswith("manifests/") and n.endswith(".json")):
        manifest = validate_manifest(contents.json(name), origin=name, error=NotVerifiedError)
        for path, entry in sorted(manifest.files.items()):
            if path not in known:
                raise NotVerifiedError(f"{name}: lists {path}, which the bundle neither holds nor lists")
            if known[path] != entry.sha256:
                raise NotVerifiedError(f"{path}: sha256 in {name} differs from the bundle's")
    for gate, record in gate_records(contents).items():
        for path, digest in sorted(record.inputs.items()):
            if path in known and "sha256:" + known[path] != digest:
                raise NotVerifiedError(f"gates/{gate}.json: input {path} has another sha256 than the bundle's")
