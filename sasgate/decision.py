"""The decision state machine (ARCHITECTURE.md, "The decision table"): gate records in, decision out.

`decide` is a pure function of the gate records: it finds the one row of `STATE_TABLE`
that the records match, derives every claim by rule (sasgate.claims), states what would
reopen the work, and returns a typed `Decision`. The `decide` stage writes it as
`decision.json` and renders `CLAIMS.md` from it; `sasgate status --record FILE` and the
archive's bundle check run the same function, so a decision can always be re-derived.

The behaviour column of the table is the behaviour-level verdict as a whole: it passes only
when both the validity gate (`behaviour`) and the `stability` gate passed. A missing
behaviour or stability record counts as not passed (row 1 takes any reconstruction and
remediation); a missing or contradictory reconstruction / remediation record matches no row
and is an error naming it. Before any row is looked up, every record is checked against itself,
the required tuples and the records it depends on (sasgate.consistency): a record whose status
does not follow from its rows is refused (RecordConsistencyError, exit 11), never decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .artifacts import atomic_write_json, atomic_write_text, canonical_json, read_json, sha256_bytes
from .claims import ABSENT, CATALOGUE, GATES, Facts
from .consistency import check_records
from .errors import ArtifactError
from .gates import GateRecord, Outcome, TupleRef
from .preregistration import FamilyCoverage, InTime, StopRef
from .validation import describe_validation

DECISION_SCHEMA = "sasgate.decision/1"
ANY = "any"
ActivePath = Literal["behaviour_invalid", "mechanism_claims_authorized", "remediated_rerun_required",
                     "limitation_lock_for_current_phase"]
DecisionState = Literal["hold", "advance", "rerun", "conditional_hold"]


@dataclass(frozen=True)
class StateRow:
    """One row of the decision table (ARCHITECTURE.md). Remediation outcomes: not_needed, found (passing candidates), stopped."""

    behaviour: str
    reconstruction: str
    remediation: str
    active_path: str
    phase_movement_authorized: bool
    decision_state: str

    def matches(self, behaviour: str, reconstruction: str, remediation: str) -> bool:
        return all(want in (ANY, got) for want, got in ((self.behaviour, behaviour),
                                                         (self.reconstruction, reconstruction),
                                                         (self.remediation, remediation)))


STATE_TABLE: tuple[StateRow, ...] = (
    StateRow("fail", ANY, ANY, "behaviour_invalid", False, "hold"),
    StateRow("pass", "pass", "not_needed", "mechanism_claims_authorized", True, "advance"),
    StateRow("pass", "fail", "found", "remediated_rerun_required", False, "rerun"),
    StateRow("pass", "fail", "stopped", "limitation_lock_for_current_phase", False, "conditional_hold"),
)
REMEDIATION_OUTCOME = {"not_needed": "not_needed", "pass": "found", "fail": "stopped"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GateSummary(_Model):
    status: Literal["pass", "fail", "not_needed", "absent"]
    sha256: str | None  # of the gate record file (canonical JSON, as write_gate writes it); null when absent
    metric: str | None
    key_figure: float | None  # the worst per-tuple value against the threshold
    comparison: str | None
    threshold: float | None
    reason: str | None
    outcome: Outcome | None = None  # the behaviour gate's SAS-vs-DIM outcome (holds / fails / inconclusive)


class ClaimEntry(_Model):
    id: str
    text: str
    rests_on: list[str]
    because: str


class Claims(_Model):
    allowed: list[ClaimEntry]
    disallowed: list[ClaimEntry]


class ReopenCondition(_Model):
    kind: Literal["sae_coverage", "family_unavailable", "rerun_with_candidates", "behaviour_gates"]
    required_tuples: list[TupleRef]
    text: str


class Decision(_Model):
    schema_: Literal["sasgate.decision/1"] = Field(alias="schema")
    active_path: ActivePath
    phase_movement_authorized: bool
    decision_state: DecisionState
    state_row: int = Field(ge=1)  # 1-based row of STATE_TABLE
    required_tuples: list[TupleRef]
    gates: dict[str, GateSummary]
    claims: Claims
    reopen_conditions: list[ReopenCondition]
    stopped_by: StopRef | None
    coverage: dict[str, str]  # candidate family -> "k/N" or "unavailable: ..."
    preregistration: InTime | None = None  # ARCHITECTURE.md, "Preregistration"; None: no lock (a study record)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# --- deriving the decision -------------------------------------------------------------------


def record_sha256(record: GateRecord) -> str:
    """sha256 of the record's canonical JSON: the bytes `write_gate` writes, so equal to the file's."""
    return sha256_bytes(canonical_json(record.to_json()).encode("utf-8"))


def key_figure(record: GateRecord) -> float | None:
    """The per-tuple value furthest on the wrong side of the comparison (the one that decides the gate)."""
    values = [t.observed for t in record.per_tuple if t.observed is not None]
    if not values:
        figure = (record.details or {}).get("key_figure")
        return float(figure) if isinstance(figure, (int, float)) and math.isfinite(figure) else None
    return min(values) if record.comparison in (">=", ">") else max(values)


def gate_summary(record: GateRecord | None) -> GateSummary:
    if record is None:
        return GateSummary(status=ABSENT, sha256=None, metric=None, key_figure=None, comparison=None,
                           threshold=None, reason=None)
    return GateSummary(status=record.status, sha256=record_sha256(record), metric=record.metric,
                       key_figure=key_figure(record), comparison=record.comparison, threshold=record.threshold,
                       reason=record.reason, outcome=record.outcome)


def paraphrase_coverage(stability: GateRecord | None) -> tuple[int | None, int | None]:
    """(declared, stable) paraphrase families, from the stability record's (seed, paraphrase set) cells.

    Paraphrase set 0 is the original wording; sets 1..n are the declared paraphrase families (the
    `steer` stage runs every set of the locked eval split, so the cells list all of them). A family
    is stable when every one of its cells agrees with the pooled decision. (None, None) when the
    record lists no cells.
    """
    cells = ((stability.details or {}) if stability is not None else {}).get("cells")
    if not isinstance(cells, list) or not cells:
        return None, None
    families: dict[int, bool] = {}
    for cell in cells:
        pset = cell.get("paraphrase_set") if isinstance(cell, dict) else None
        if isinstance(pset, int) and pset > 0:
            families[pset] = families.get(pset, True) and cell.get("agrees") is True
    return len(families), sum(families.values())


def family_texts(stability: GateRecord | None) -> tuple[str, ...]:
    """How each declared paraphrase family was made, as the stability record names it (for the scoped claim)."""
    fams = ((stability.details or {}) if stability is not None else {}).get("paraphrase_families")
    if not isinstance(fams, list):
        return ()
    held = {True: "yes", False: "no", None: "unknown"}
    return tuple(f"set {f.get('paraphrase_set')}: {f.get('made_by')} (held out from training: "
                 f"{held.get(f.get('held_out_from_training'), 'unknown')}; from selection: "
                 f"{held.get(f.get('held_out_from_selection'), 'unknown')})" for f in fams if isinstance(f, dict))


def _remediation_facts(record: GateRecord | None) -> tuple[StopRef | None, dict[str, FamilyCoverage]]:
    if record is None or record.status == "not_needed":
        return None, {}
    details = record.details or {}
    try:
        stop = StopRef.model_validate(details["stopped_by"]) if details.get("stopped_by") else None
        coverage = {f: FamilyCoverage.model_validate(c) for f, c in sorted(details.get("coverage", {}).items())}
    except (ValidationError, AttributeError, TypeError) as exc:
        raise ArtifactError(f"remediation gate record: unreadable stopped_by / coverage details: {exc}") from None
    if record.status == "fail" and stop is None:
        raise ArtifactError("remediation gate record: status fail (stopped) but no stopped_by rule is named")
    return stop, coverage


def tuple_label(t: TupleRef) -> str:
    return f"{t.model} layer {t.layer} {t.site}"


def _tuples_text(tuples: Sequence[TupleRef]) -> str:
    return "; ".join(tuple_label(t) for t in tuples)


def _failed_tuples(record: GateRecord | None, required: Sequence[TupleRef]) -> list[TupleRef]:
    if record is None:
        return list(required)
    failing = {(t.tuple.model, t.tuple.layer, t.tuple.site) for t in record.per_tuple if t.status == "fail"}
    return [t for t in required if (t.model, t.layer, t.site) in failing]


def _reopen(row: StateRow, records: Mapping[str, GateRecord | None], required: Sequence[TupleRef],
            coverage: Mapping[str, FamilyCoverage]) -> list[ReopenCondition]:
    recon = records.get("reconstruction")
    if row.decision_state == "advance":
        return []
    if row.decision_state == "hold":
        failed = [g for g in ("behaviour", "stability") if (records.get(g) is None or records[g].status != "pass")]
        return [ReopenCondition(kind="behaviour_gates", required_tuples=[], text=(
            f"The behaviour-level gates must pass on a re-run ({', '.join(failed)} did not): fix what their "
            "records name, without changing the locked evaluation set or scorer to fit the result."))]
    if row.decision_state == "rerun":
        return [ReopenCondition(kind="rerun_with_candidates", required_tuples=_failed_tuples(recon, required), text=(
            "Pin the passing candidate SAEs named in gates/remediation.json in params.tuples and re-run the "
            "pipeline; the decision is re-made on the re-run's reconstruction gate."))]
    uncovered = _failed_tuples(recon, required)
    assert recon is not None  # rows 3 and 4 need a reconstruction record
    out = [ReopenCondition(kind="sae_coverage", required_tuples=uncovered, text=(
        f"A new SAE release that covers every required tuple listed here under the preregistered constraints "
        f"and passes the reconstruction gate there ({recon.metric} {recon.comparison} "
        f"{recon.threshold}); then re-run remediation and decide (`dvc repro`)."))]
    for fam, cov in coverage.items():
        if not cov.available:
            out.append(ReopenCondition(kind="family_unavailable", required_tuples=uncovered, text=(
                f"Candidate family {fam} could not be searched ({cov.text}); a re-run of remediation with it "
                "reachable may find covering SAEs there.")))
    return out


def _as_tuple(t: TupleRef | Mapping[str, Any]) -> TupleRef:
    return t if isinstance(t, TupleRef) else TupleRef.model_validate(dict(t))


def decide(records: Mapping[str, GateRecord | None], required_tuples: Sequence[TupleRef | Mapping[str, Any]],
           stated: bool = False, preregistration: InTime | None = None) -> Decision:
    """The decision that follows from the gate records (keys: behaviour, stability, reconstruction,
    remediation; None or missing = absent). Pure: no I/O. RecordConsistencyError when a record contradicts
    itself (`stated`: a study record's typed behaviour figures, see sasgate.consistency), ArtifactError
    when no table row matches. `preregistration` (whether the lock preceded the results) is carried as it is."""
    unknown = sorted(set(records) - set(GATES))
    if unknown:
        raise ArtifactError(f"unknown gate records {unknown}; the decision reads {list(GATES)}")
    for name, rec in records.items():
        if rec is not None and rec.gate != name:
            raise ArtifactError(f"the record given as {name!r} is the {rec.gate!r} gate")
    required = [_as_tuple(t) for t in required_tuples]
    if not required:
        raise ArtifactError("a decision needs at least one required tuple")
    check_records(records, required, stated=stated)
    status = {g: (records[g].status if records.get(g) is not None else ABSENT) for g in GATES}
    behaviour = "pass" if status["behaviour"] == status["stability"] == "pass" else "fail"
    remediation = REMEDIATION_OUTCOME.get(status["remediation"], ABSENT)
    row_no, row = next(((i, r) for i, r in enumerate(STATE_TABLE, 1)
                        if r.matches(behaviour, status["reconstruction"], remediation)), (0, None))
    if row is None:
        raise ArtifactError(
            f"no row of the decision table matches behaviour {behaviour}, reconstruction {status['reconstruction']}, "
            f"remediation {status['remediation']}: "
            + ("a gate record is missing" if ABSENT in (status["reconstruction"], status["remediation"])
               else "the reconstruction and remediation records contradict each other (re-run the pipeline)"))
    stop, coverage = _remediation_facts(records.get("remediation"))
    declared, stable = paraphrase_coverage(records.get("stability"))
    behaviour_rec = records.get("behaviour")
    facts = Facts(status=status, paraphrase_families_declared=declared, paraphrase_families_stable=stable,
                  families=family_texts(records.get("stability")),
                  outcome=behaviour_rec.outcome if behaviour_rec is not None else None)
    allowed, disallowed = [], []
    for claim in CATALOGUE:
        ok, because = claim.judge(facts)
        entry = ClaimEntry(id=claim.id, text=claim.text, rests_on=claim.rests_on, because=because)
        if ok:
            allowed.append(entry)
        elif claim.kind == "finding":
            disallowed.append(entry)
    return Decision(
        schema=DECISION_SCHEMA, active_path=row.active_path, phase_movement_authorized=row.phase_movement_authorized,
        decision_state=row.decision_state, state_row=row_no, required_tuples=required,
        gates={g: gate_summary(records.get(g)) for g in GATES},
        claims=Claims(allowed=allowed, disallowed=disallowed),
        reopen_conditions=_reopen(row, records, required, coverage), stopped_by=stop,
        coverage={f: c.text for f, c in coverage.items()}, preregistration=preregistration,
    )


# --- reading, writing, rendering -----------------------------------------------------------


def validate_decision(raw: Any, origin: str = "decision") -> Decision:
    if not isinstance(raw, dict) or raw.get("schema") != DECISION_SCHEMA:
        found = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
        raise ArtifactError(f"{origin}: not a {DECISION_SCHEMA} decision (schema {found!r})")
    try:
        return Decision.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{origin}: invalid decision: {describe_validation(exc)}") from None


def read_decision(path: str | Path) -> Decision:
    """Read and validate decision.json; missing, corrupt or schema-invalid files raise ArtifactError."""
    return validate_decision(read_json(path), origin=str(path))


def write_decision(path: str | Path, decision: Decision) -> None:
    atomic_write_json(path, decision.to_json())


def write_claims_md(path: str | Path, decision: Decision) -> None:
    atomic_write_text(path, render_claims_md(decision))


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _claim_lines(entries: Sequence[ClaimEntry]) -> list[str]:
    if not entries:
        return ["- (none)"]
    return [f"- **{c.id}**: {c.text}  \n  _Rests on: {', '.join(c.rests_on)} ({c.because})._" for c in entries]


def _preregistration_lines(p: InTime | None) -> list[str]:
    """Whether the protocol preceded the results, said plainly (nothing for a decision made without a lock)."""
    if p is None:
        return []
    if not p.preregistered_after_results:
        return [f"Preregistration: preregistered before results (lock `{p.lock_sha256}`): no gate record existed "
                "when the protocol these gates are judged by was fixed.", ""]
    return [f"Preregistration: **preregistered after results**. The protocol these gates are judged by (lock "
            f"`{p.lock_sha256}`) was fixed after these gate records existed: "
            + "; ".join(r.text for r in p.preceding_records) + ". Its threshold, required tuples and stop rules "
            "may have been chosen with those results in view.", ""]


def render_claims_md(decision: Decision) -> str:
    """CLAIMS.md: generated from the decision alone, byte-identical for equal decisions. Never edit it."""
    d = decision
    lines = [
        "# Claims",
        "",
        "<!-- Generated by sasgate from decision.json (schema sasgate.decision/1). Do not edit: "
        "`sasgate status` flags a changed copy. -->",
        "",
        f"Decision: **{d.decision_state}** (active path `{d.active_path}`, phase movement authorized: "
        f"`{str(d.phase_movement_authorized).lower()}`).",
        "",
        *_preregistration_lines(d.preregistration),
        "## We can claim",
        "",
        *_claim_lines(d.claims.allowed),
        "",
        "## We cannot claim",
        "",
        *_claim_lines(d.claims.disallowed),
        "",
        "## What would reopen this work",
        "",
    ]
    if not d.reopen_conditions:
        lines.append("- Nothing is closed: phase movement is authorized.")
    for c in d.reopen_conditions:
        tuples = f" Required tuples: {_tuples_text(c.required_tuples)}." if c.required_tuples else ""
        lines.append(f"- ({c.kind}) {c.text}{tuples}")
    lines += [
        "",
        "## Final state",
        "",
        f"- active_path: `{d.active_path}`",
        f"- phase_movement_authorized: `{str(d.phase_movement_authorized).lower()}`",
        f"- decision_state: `{d.decision_state}` (row {d.state_row} of the decision table)",
    ]
    if d.stopped_by is not None:
        lines.append(f"- stopped by: {d.stopped_by.id} ({d.stopped_by.kind}): {d.stopped_by.text}")
    if d.coverage:
        lines.append("- candidate coverage: " + ", ".join(f"{f} = {t}" for f, t in d.coverage.items()))
    lines += ["", "| gate | status | key figure | threshold | outcome | record sha256 |", "|---|---|---|---|---|---|"]
    for name in sorted(d.gates, key=lambda n: (GATES.index(n) if n in GATES else len(GATES), n)):
        g = d.gates[name]
        threshold = "—" if g.threshold is None else f"{g.metric} {g.comparison} {_fmt(g.threshold)}"
        lines.append(f"| {name} | {g.status} | {_fmt(g.key_figure)} | {threshold} | {g.outcome or '—'} | "
                     f"{g.sha256 or '—'} |")
    return "\n".join(lines) + "\n"
