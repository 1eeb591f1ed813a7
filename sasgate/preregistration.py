"""Preregistration of the remediation protocol: stop rules fixed before remediation runs.

`preregistration/stop_rules.yaml` holds the stop rules (id, kind, plain-language text,
parameters; applied in file order) and the candidate families (id, text). `sasgate
preregister --reason TEXT` writes `preregistration/lock.json`: the sha256 of the rules
file, the protocol it defines together with the params it reads (required tuples, model,
the reconstruction threshold candidates are judged by and the extra reconstruction criteria, `remediation:` families and
constraints), the git commit, and the gate records present when it was made. The
`remediation` stage refuses (PreregistrationError, exit 8) without a lock, or when anything
preregistered changed since, naming each difference: nobody can move the goalposts quietly.

The git commit is provenance only: a copy of the project in a fresh repository (tests,
`sasgate archive --reproduce`) keeps a lock whose commit is not in its history, and the
content digests still decide. Re-running `sasgate preregister` is the one deliberate way to
change the protocol; the lock's history keeps every earlier digest and reason, and which
gate records existed at each.

In time (`in_time`): the protocol now locked was preregistered after results when any gate
record existed (present in the workspace, or listed in dvc.lock) at or before the history
entry that first fixed it. `decide` carries the answer into decision.json and CLAIMS.md,
`status` flags it, the bundle's signed predicate repeats it (ARCHITECTURE.md, "Preregistration").
`--tsa URL` adds an RFC 3161 timestamp over the lock file's bytes (sasgate.timestamp).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .artifacts import atomic_write_bytes, canonical_json, read_yaml, sha256_file
from .errors import LockedSetError, PreregistrationError, SasgateError, TimestampError
from .evalset import build_lock, read_lock, records_digest
from .params import Params
from .validation import describe_validation
from .paths import Paths

if TYPE_CHECKING:
    from .timestamp import Stamp

STOP_RULES_SCHEMA = "sasgate.stop_rules/1"
LOCK_SCHEMA = "sasgate.preregistration/1"
PREREGISTER_HINT = "sasgate preregister --reason TEXT"
RuleKind = Literal["budget", "coverage", "exhausted"]
_RULE_PARAMETERS: dict[str, set[str]] = {"budget": {"max_candidates"}, "coverage": set(), "exhausted": set()}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StopRule(_Strict):
    """One stop rule. `text` may name its parameters as {name}; `stated` fills them in."""

    id: str = Field(pattern=r"^K[0-9]+$")
    kind: RuleKind
    text: str = Field(min_length=1)
    parameters: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _parameters_fit_kind(self) -> "StopRule":
        want = _RULE_PARAMETERS[self.kind]
        if set(self.parameters) != want:
            raise ValueError(f"rule {self.id} ({self.kind}) takes parameters {sorted(want)}, got {sorted(self.parameters)}")
        if any(v < 0 for v in self.parameters.values()):
            raise ValueError(f"rule {self.id}: parameters must be >= 0")
        try:
            self.text.format(**self.parameters)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"rule {self.id}: text names an unknown parameter ({exc})") from None
        return self

    @property
    def stated(self) -> str:
        return self.text.format(**self.parameters)


class Family(_Strict):
    id: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    text: str = Field(min_length=1)


class StopRules(_Strict):
    schema_: Literal["sasgate.stop_rules/1"] = Field(alias="schema")
    rules: list[StopRule] = Field(min_length=1)
    families: list[Family] = Field(min_length=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _unique(self) -> "StopRules":
        for what, ids in (("rule ids", [r.id for r in self.rules]), ("family ids", [f.id for f in self.families]),
                          ("rule kinds", [r.kind for r in self.rules])):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ValueError(f"{what} repeat: {', '.join(dup)}")
        if not any(r.kind == "exhausted" for r in self.rules):
            raise ValueError("a rule of kind 'exhausted' is required, so that every search stops")
        return self

    def rule(self, kind: RuleKind) -> StopRule | None:
        return next((r for r in self.rules if r.kind == kind), None)


# --- what the remediation gate record states (read back by sasgate.decision) ---------------


class StopRef(_Strict):
    """The rule that stopped remediation, as stated when it fired."""

    id: str
    kind: RuleKind
    text: str


class FamilyCoverage(BaseModel):
    """Coverage k/N of one candidate family, or why it could not be searched (never a silent 0)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    available: bool
    covered: int | None = None
    required: int
    text: str  # "0/4", or "unavailable: hub unreachable (...)"


# --- loading and the lock -------------------------------------------------------------------


M = TypeVar("M", bound=BaseModel)


def load_yaml_model(path: Path, model: type[M], schema: str, error: type[SasgateError], what: str) -> M:
    """Read a YAML record with a `schema` key and validate it; every problem is one `error` naming it."""
    raw = read_yaml(path, error, f"no {what} at {path}")
    if not isinstance(raw, dict) or raw.get("schema") != schema:
        raise error(f"{path}: expected a mapping with schema {schema!r}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{path}: invalid {what}: {describe_validation(exc)}") from None


def load_stop_rules(path: Path) -> StopRules:
    return load_yaml_model(path, StopRules, STOP_RULES_SCHEMA, PreregistrationError, "stop rules")


def protocol(rules: StopRules, params: Params) -> dict[str, Any]:
    """Everything the preregistration fixes, as plain JSON (the lock stores it to name differences)."""
    return {
        "rules": [r.model_dump(mode="json") for r in rules.rules],
        "families": [f.model_dump(mode="json") for f in rules.families],
        "params": {
            "model": params.model.name,
            "tuples": [{"layer": t.layer, "site": t.site} for t in params.tuples],
            "reconstruction": {"threshold": params.reconstruction.threshold,
                               "comparison": params.reconstruction.comparison,
                               "criteria": [c.model_dump(mode="json") for c in params.reconstruction.criteria]},
            "remediation": params.remediation.model_dump(mode="json", exclude={"hub_access"}),
        },
    }


def _records(paths: Paths, content: dict[str, Any]) -> list[dict[str, Any]]:
    """The locked items: the rules file by digest, then each rule, family and params section."""
    rel = paths.rel(paths.stop_rules)
    return [{"id": f"file:{rel}", "sha256": sha256_file(paths.stop_rules)},
            *({**r, "id": f"rule:{r['id']}"} for r in content["rules"]),
            *({**f, "id": f"family:{f['id']}"} for f in content["families"]),
            *({"id": f"params:{k}", "value": v} for k, v in content["params"].items())]


def git_commit(root: Path) -> str | None:
    """HEAD of the repository at root, or None outside git (provenance only)."""
    res = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


# --- in time: which results preceded the protocol ------------------------------------------

JUDGED_GATES = ("behaviour", "stability", "reconstruction", "remediation")  # every record the decision judges


class PrecedingRecord(_Strict):
    """A gate record that existed when a lock was made: in the workspace (its sha256 and status then),
    and/or listed as an output in dvc.lock (its stage had run here, even if the file was removed)."""

    gate: Literal["behaviour", "stability", "reconstruction", "remediation"]
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    status: Literal["pass", "fail", "not_needed", "unreadable"] | None = None
    in_dvc_lock: bool = False

    @model_validator(mode="after")
    def _seen_somewhere(self) -> "PrecedingRecord":
        if self.sha256 is None and not self.in_dvc_lock:
            raise ValueError(f"gate {self.gate}: a preceding record needs its sha256 or in_dvc_lock")
        if (self.sha256 is None) != (self.status is None):
            raise ValueError(f"gate {self.gate}: sha256 and status come together (a file that was present)")
        return self

    @property
    def text(self) -> str:
        seen = [f"{self.status}, sha256 {self.sha256[:12]}…" if self.sha256 else "",
                "listed in dvc.lock" if self.in_dvc_lock else ""]
        return f"gates/{self.gate}.json ({'; '.join(s for s in seen if s)})"


class InTime(_Strict):
    """Whether the protocol now locked was fixed before every result it judges (decision.json carries it)."""

    lock_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # the locked protocol's digest (lock.json `sha256`)
    preregistered_after_results: bool
    preceding_records: list[PrecedingRecord]

    @model_validator(mode="after")
    def _flag_follows(self) -> "InTime":
        if self.preregistered_after_results != bool(self.preceding_records):
            raise ValueError("preregistered_after_results must be true exactly when records preceded the lock")
        return self

    @property
    def text(self) -> str:
        if not self.preregistered_after_results:
            return f"preregistered before results: no gate record existed when protocol {self.lock_sha256[:12]}… was fixed"
        return (f"preregistered after results: protocol {self.lock_sha256[:12]}… was fixed after gate records it "
                "judges existed: " + ", ".join(r.text for r in self.preceding_records))


def existing_records(paths: Paths) -> dict[str, dict[str, Any]]:
    """The gate records that exist now: files in the workspace, and outputs dvc.lock lists (made_after)."""
    from .gates import read_gate

    listed: set[str] = set()
    dvc_lock = paths.root / "dvc.lock"
    if dvc_lock.is_file():
        raw = read_yaml(dvc_lock, PreregistrationError, "no dvc.lock")
        stages = raw.get("stages") if isinstance(raw, dict) else None
        if not isinstance(stages, dict):
            raise PreregistrationError("dvc.lock: no `stages` mapping; cannot tell which results exist")
        listed = {o.get("path") for st in stages.values() if isinstance(st, dict)
                  for o in st.get("outs", []) or [] if isinstance(o, dict)}
    out: dict[str, dict[str, Any]] = {}
    for name in JUDGED_GATES:
        path, rel = paths.gate(name), f"gates/{name}.json"
        present, in_lock = path.is_file(), rel in listed
        if not (present or in_lock):
            continue
        status = None
        if present:
            try:
                status = read_gate(path).status
            except SasgateError:
                status = "unreadable"
        out[name] = PrecedingRecord(gate=name, sha256=sha256_file(path) if present else None, status=status,
                                    in_dvc_lock=in_lock).model_dump(mode="json", exclude={"gate"})
    return out


def _made_after(entry: Any, where: str) -> list[PrecedingRecord]:
    if not isinstance(entry, dict):
        raise PreregistrationError(f"{where}: made_after must be a mapping of gate records, got {type(entry).__name__}")
    try:
        return [PrecedingRecord.model_validate({**v, "gate": g}) for g, v in sorted(entry.items())]
    except (ValidationError, TypeError) as exc:
        detail = describe_validation(exc) if isinstance(exc, ValidationError) else str(exc)
        raise PreregistrationError(f"{where}: invalid made_after: {detail}") from None


def in_time(lock: dict[str, Any], origin: str = "preregistration/lock.json") -> InTime:
    """Which gate records existed before the protocol now locked was first fixed.

    Results, once they existed, stay in the past: a history entry counts every record seen at it
    or at any earlier entry (deleting the records and re-preregistering does not make a protocol
    early). The entry that first fixed the current digest decides; re-locking the same protocol
    later (e.g. to add a timestamp) keeps its place in time.
    """
    if not (isinstance(lock, dict) and lock.get("schema") == LOCK_SCHEMA and isinstance(lock.get("sha256"), str)
            and isinstance(lock.get("history"), list)):
        raise PreregistrationError(f"{origin}: not a {LOCK_SCHEMA} lock with a sha256 and a history")
    digest, history = lock["sha256"], lock["history"]
    top = _made_after(lock.get("made_after"), f"{origin}: made_after")
    last = history[-1] if history else None
    if isinstance(last, dict) and "made_after" in last and _made_after(last["made_after"], origin) != top:
        raise PreregistrationError(f"{origin}: made_after differs from its last history entry (edited by hand?)")
    seen: dict[tuple[str, str | None], PrecedingRecord] = {}
    for i, entry in enumerate(history):
        where = f"{origin}: history entry {i + 1}"
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise PreregistrationError(f"{where}: not a lock history entry")
        if "made_after" in entry:
            recs = _made_after(entry["made_after"], where)
        elif i == len(history) - 1:  # written before history entries recorded it: the lock's own field
            recs = top
        else:
            raise PreregistrationError(f"{where} does not record which gate records existed then; "
                                       "the lock cannot say whether its protocol preceded the results")
        for r in recs:
            seen.setdefault((r.gate, r.sha256), r)
        if entry["sha256"] == digest:
            records = sorted(seen.values(), key=lambda r: (JUDGED_GATES.index(r.gate), r.sha256 or ""))
            return InTime(lock_sha256=digest, preregistered_after_results=bool(records), preceding_records=records)
    raise PreregistrationError(f"{origin}: the locked digest {digest} is not in its own history")


def read_in_time(paths: Paths) -> InTime | None:
    """`in_time` of the project's lock; None when there is no lock."""
    lock = read_preregistration(paths)
    return None if lock is None else in_time(lock, paths.rel(paths.preregistration_lock))


# --- writing the lock, optionally timestamped -------------------------------------------------


def timestamp_paths(paths: Paths) -> tuple[Path, Path]:
    """(the RFC 3161 reply over lock.json, the trusted TSA certificate it is checked against)."""
    folder = paths.preregistration_lock.parent
    return folder / "timestamp.tsr", folder / "tsa.pem"


def preregister(params: Params, paths: Paths, reason: str, tsa: str | None = None,
                tsa_cert: Path | None = None) -> dict[str, Any]:
    """Write preregistration/lock.json for the current stop rules and protocol params.

    With `tsa` (and the TSA's or its CA's certificate `tsa_cert`) the lock is timestamped first:
    when the TSA fails or its reply does not verify, nothing is written (TimestampError).
    Without it, a timestamp of the previous lock is removed (it covers other bytes).
    """
    from . import timestamp

    if (tsa is None) != (tsa_cert is None):
        raise TimestampError("a timestamp needs both the TSA's URL (--tsa) and its trusted certificate (--tsa-cert)")
    rules = load_stop_rules(paths.stop_rules)
    content = protocol(rules, params)
    previous = read_preregistration(paths)
    made_after = existing_records(paths)
    lock = build_lock(
        paths.preregistration_lock, _records(paths, content), schema=LOCK_SCHEMA, reason=reason, source=content,
        counts={"rules": len(rules.rules), "families": len(rules.families)},
        extra={"stop_rules": {"path": paths.rel(paths.stop_rules), "sha256": sha256_file(paths.stop_rules)},
               "git_commit": git_commit(paths.root), "made_after": made_after},
        what="preregistration",
    )
    if previous is not None and "made_after" not in lock["history"][-2]:
        lock["history"][-2] = {**lock["history"][-2], "made_after": previous.get("made_after", {})}
    lock["history"][-1] = {**lock["history"][-1], "made_after": made_after}
    data = canonical_json(lock).encode("utf-8")
    token_path, cert_path = timestamp_paths(paths)
    reply = cert = None
    if tsa is not None and tsa_cert is not None:
        try:
            cert = tsa_cert.read_bytes()
        except OSError as exc:
            raise TimestampError(f"--tsa-cert {tsa_cert}: unreadable ({exc.strerror})") from None
        reply, _ = timestamp.request(tsa, data, cert, f"--tsa-cert {tsa_cert}")
    atomic_write_bytes(paths.preregistration_lock, data)
    if reply is not None and cert is not None:
        atomic_write_bytes(token_path, reply)
        atomic_write_bytes(cert_path, cert)
    else:
        for stale in (token_path, cert_path):
            stale.unlink(missing_ok=True)
    return lock


def check_timestamp(paths: Paths, trusted: Path | None = None) -> Stamp | None:
    """The verified timestamp of the project's lock, or None when it has none.

    Trust anchor: `trusted` when given, else preregistration/tsa.pem (recorded by `preregister --tsa-cert`)."""
    from . import timestamp

    token_path, cert_path = timestamp_paths(paths)
    if not token_path.is_file():
        return None
    anchor = trusted or cert_path
    if not anchor.is_file():
        raise TimestampError(f"{paths.rel(token_path)} has no trusted TSA certificate to check it against "
                             f"({paths.rel(cert_path)} is missing; give one with --tsa-cert)")
    lock = paths.preregistration_lock.read_bytes() if paths.preregistration_lock.is_file() else b""
    return timestamp.verify(token_path.read_bytes(), lock, anchor.read_bytes(), paths.rel(token_path), str(anchor))


def read_preregistration(paths: Paths) -> dict[str, Any] | None:
    try:
        return read_lock(paths.preregistration_lock, schema=LOCK_SCHEMA, what="preregistration")
    except LockedSetError as exc:
        raise PreregistrationError(str(exc)) from None


def _diff(old: Any, new: Any, where: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            sub = f"{where}.{k}" if where else str(k)
            if k not in new:
                out.append(f"{sub} removed (was {old[k]!r})")
            elif k not in old:
                out.append(f"{sub} added ({new[k]!r})")
            else:
                out += _diff(old[k], new[k], sub)
        return out
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["id"]: {k: v for k, v in i.items() if k != "id"} for i in items}


def differences(locked: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Plain-language differences between two protocols: which rule, family or param changed, and how."""
    out: list[str] = []
    for what in ("rules", "families"):
        name = what[:-1] if what == "rules" else "family"
        old, new = _by_id(locked.get(what, [])), _by_id(now[what])
        for i in old:
            out += [f"{name} {i} removed"] if i not in new else [f"{name} {i} {d}" for d in _diff(old[i], new[i], "")]
        out += [f"{name} {i} added" for i in new if i not in old]
        if [i for i in old if i in new] != [i for i in new if i in old]:
            out.append(f"{what} reordered: {', '.join(old)} -> {', '.join(new)} (rules apply in file order)")
    out += [f"params {d}" for d in _diff(locked.get("params", {}), now["params"], "")]
    return out


def verify(params: Params, paths: Paths) -> dict[str, Any]:
    """The lock, if the stop rules and protocol params are exactly as preregistered; else PreregistrationError."""
    lock = read_preregistration(paths)
    rel = paths.rel(paths.preregistration_lock)
    if lock is None:
        raise PreregistrationError(f"no preregistration at {rel}: run `{PREREGISTER_HINT}` before remediation")
    rules = load_stop_rules(paths.stop_rules)
    content = protocol(rules, params)
    if records_digest(_records(paths, content)) == lock["sha256"]:
        return lock
    diffs = differences(lock["source"], content)
    if sha256_file(paths.stop_rules) != lock["stop_rules"]["sha256"] and not any(
            d.startswith(("rule", "famil")) for d in diffs):
        diffs.insert(0, f"{paths.rel(paths.stop_rules)} changed outside the rules (comments or formatting)")
    raise PreregistrationError(
        f"the remediation protocol changed after preregistration ({rel}): {'; '.join(diffs) or 'unknown change'}; "
        f"remediation refuses to run under rules fixed after the fact; if this change is intended, "
        f"preregister again with `{PREREGISTER_HINT}` (the lock keeps the history)"
    )
