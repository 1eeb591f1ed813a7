"""Preregistration of the remediation protocol: stop rules fixed before remediation runs.

`preregistration/stop_rules.yaml` holds the stop rules (id, kind, plain-language text,
parameters; applied in file order) and the candidate families (id, text). `sasgate
preregister --reason TEXT` writes `preregistration/lock.json`: the sha256 of the rules
file, the protocol it defines together with the params it reads (required tuples, model,
the reconstruction threshold candidates are judged by, `remediation:` families and
constraints), the git commit, and the gate records present when it was made. The
`remediation` stage refuses (PreregistrationError, exit 8) without a lock, or when anything
preregistered changed since, naming each difference: nobody can move the goalposts quietly.

The git commit is provenance only: a copy of the project in a fresh repository (tests,
`sasgate archive --reproduce`) keeps a lock whose commit is not in its history, and the
content digests still decide. Re-running `sasgate preregister` is the one deliberate way to
change the protocol; the lock's history keeps every earlier digest and reason.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .artifacts import read_yaml, sha256_file
from .errors import LockedSetError, PreregistrationError, SasgateError
from .evalset import read_lock, records_digest, write_lock
from .params import Params
from .validation import describe_validation
from .paths import Paths

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
                               "comparison": params.reconstruction.comparison},
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


def preregister(params: Params, paths: Paths, reason: str) -> dict[str, Any]:
    """Write preregistration/lock.json for the current stop rules and protocol params."""
    from .gates import read_gate

    rules = load_stop_rules(paths.stop_rules)
    content = protocol(rules, params)
    made_after = {}
    for name in ("behaviour", "stability", "reconstruction", "remediation"):
        if paths.gate(name).is_file():
            made_after[name] = {"sha256": sha256_file(paths.gate(name)), "status": read_gate(paths.gate(name)).status}
    return write_lock(
        paths.preregistration_lock, _records(paths, content), schema=LOCK_SCHEMA, reason=reason, source=content,
        counts={"rules": len(rules.rules), "families": len(rules.families)},
        extra={"stop_rules": {"path": paths.rel(paths.stop_rules), "sha256": sha256_file(paths.stop_rules)},
               "git_commit": git_commit(paths.root), "made_after": made_after},
        what="preregistration",
    )


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
