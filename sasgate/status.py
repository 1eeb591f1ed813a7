"""`sasgate status`: where a project stands, and study records decided from their figures alone.

For a project: the decision on disk and whether it still follows from the gate records, every
gate (status, key figure, threshold), the reopen conditions, whether CLAIMS.md is the one the
decision renders, whether what is on disk is what the pipeline wrote (`_outputs`: every stage
dvc.yaml declares has its manifest, every out it declares exists, matches the manifest and is
listed in it, and `dvc status` finds it unchanged against dvc.lock), whether the preregistration
still matches the stop rules, whether it preceded every gate record it judges (a protocol fixed
after results is flagged), and its RFC 3161 timestamp, verified offline (a bad one: exit 12).
ARCHITECTURE.md, "What `sasgate status` checks".

For a study record (`records/*.yaml`, schema sasgate.study_record/1): its figures become gate
records (statuses computed from the figures, e.g. each nMSE against its threshold), which go
through the same `decide` as the pipeline, so the record's decision and CLAIMS.md can be
reproduced and compared with what the study concluded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .artifacts import iter_files, read_manifest, verify_manifest
from .claims import GATES
from .decision import Decision, decide, gate_summary, read_decision, render_claims_md, tuple_label
from .errors import ArtifactError, PreregistrationError, RecordConsistencyError, TimestampError
from .gates import GATE_SCHEMA, GateRecord, TupleRef, compare, read_gate, validate_gate
from .params import Params
from .paths import Paths
from .preregistration import InTime, StopRef, check_timestamp, load_yaml_model, read_in_time

RECORD_SCHEMA = "sasgate.study_record/1"


class _Rec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecordTuple(_Rec):
    layer: int = Field(ge=0)
    site: str
    observed: float


class RecordGate(_Rec):
    """A gate as a study reported it: figures per tuple, or a stated status where figures are absent."""

    status: Literal["pass", "fail"] | None = None
    outcome: Literal["holds", "fails", "inconclusive"] | None = None  # the behaviour gate's, as reported
    metric: str
    threshold: float
    comparison: Literal["<=", "<", ">=", ">"]
    reason: str | None = None
    per_tuple: list[RecordTuple] = []


class RecordFamily(_Rec):
    covered: int = Field(ge=0)
    required: int = Field(ge=1)


class RecordRemediation(_Rec):
    coverage: dict[str, RecordFamily]
    stopped_by: StopRef | None = None


class RecordGates(_Rec):
    behaviour: RecordGate
    stability: RecordGate
    reconstruction: RecordGate
    remediation: RecordRemediation | None = None


class Expected(_Rec):
    active_path: str
    phase_movement_authorized: bool
    decision_state: str
    allowed: list[str]
    disallowed: list[str]
    reopen_conditions: int = Field(ge=0)


class StudyRecord(_Rec):
    schema_: Literal["sasgate.study_record/1"] = Field(alias="schema")
    title: str
    note: str
    model: str
    gates: RecordGates
    expected: Expected | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def load_study_record(path: str | Path) -> StudyRecord:
    return load_yaml_model(Path(path), StudyRecord, RECORD_SCHEMA, ArtifactError, "study record")


def _gate(name: str, status: str, g: RecordGate | None, per_tuple: list[dict[str, Any]], reason: str,
          details: dict[str, Any] | None = None) -> GateRecord:
    stated = {"comparisons": [], "outcome": g.outcome if g else None} if name == "behaviour" else {}
    return validate_gate({
        "schema": GATE_SCHEMA, "gate": name, "status": status, "metric": g.metric if g else "nmse",
        "threshold": g.threshold if g else None, "comparison": g.comparison if g else None,
        "per_tuple": per_tuple, "inputs": {}, "params": {"source": "study record"}, "reason": reason,
        "details": details, **stated,
    }, origin=f"study record gate {name}")


def record_gates(rec: StudyRecord) -> tuple[dict[str, GateRecord], list[TupleRef]]:
    """Gate records computed from the study's figures, and its required tuples."""
    out: dict[str, GateRecord] = {}
    for name in ("behaviour", "stability"):
        g: RecordGate = getattr(rec.gates, name)
        if g.status is None:
            raise ArtifactError(f"study record: gate {name} needs a status (its figures are not part of records)")
        if (name == "behaviour") != (g.outcome is not None):
            raise ArtifactError("study record: the behaviour gate, and only it, states its outcome (holds, fails or "
                                "inconclusive)")
        out[name] = _gate(name, g.status, g, [], g.reason or f"{name} {g.status} (as reported)")
    r = rec.gates.reconstruction
    if not r.per_tuple:
        raise ArtifactError("study record: the reconstruction gate needs per-tuple figures")
    tuples = [TupleRef(model=rec.model, layer=t.layer, site=t.site) for t in r.per_tuple]
    rows, failed = [], []
    for ref, t in zip(tuples, r.per_tuple):
        ok = compare(t.observed, r.comparison, r.threshold)
        rows.append({"tuple": ref.model_dump(), "observed": t.observed, "ci95": None, "status": "pass" if ok else "fail"})
        failed += [] if ok else [t.observed]
    if r.status is not None and r.status != ("fail" if failed else "pass"):
        raise ArtifactError(f"study record: reconstruction states status {r.status}, but its figures give "
                            f"{'fail' if failed else 'pass'}")
    span = f"{min(failed):.3g}–{max(failed):.3g}" if failed else ""
    out["reconstruction"] = _gate(
        "reconstruction", "fail" if failed else "pass", r, rows,
        f"{r.metric} {span} above threshold {r.threshold} on {len(failed)}/{len(rows)} required tuples" if failed
        else f"{r.metric} {r.comparison} {r.threshold} on {len(rows)}/{len(rows)} required tuples")
    m = rec.gates.remediation
    if m is not None:
        coverage = {f: {"available": True, "covered": c.covered, "required": c.required,
                        "text": f"{c.covered}/{c.required}"} for f, c in sorted(m.coverage.items())}
        status = "fail" if m.stopped_by else ("pass" if failed else "not_needed")
        cov_text = ", ".join(f"{f} = {c['text']}" for f, c in coverage.items())
        reason = (f"stopped by {m.stopped_by.id}: {cov_text}" if m.stopped_by
                  else f"{'candidates found' if failed else 'not needed'}: {cov_text}")
        per = [{"tuple": t.model_dump(), "observed": None, "ci95": None,
                "status": "not_needed" if status == "not_needed" else ("fail" if status == "fail" else "pass")}
               for t in tuples]
        details = {"stopped_by": m.stopped_by.model_dump() if m.stopped_by else None, "coverage": coverage}
        out["remediation"] = _gate("remediation", status, r, per, reason, details)
    return out, tuples


def expected_mismatches(decision: Decision, expected: Expected | None) -> list[str]:
    """How the decision differs from what the study concluded (empty: reproduced exactly)."""
    if expected is None:
        return []
    got = {"active_path": decision.active_path, "phase_movement_authorized": decision.phase_movement_authorized,
           "decision_state": decision.decision_state, "allowed": [c.id for c in decision.claims.allowed],
           "disallowed": [c.id for c in decision.claims.disallowed],
           "reopen_conditions": len(decision.reopen_conditions)}
    want = expected.model_dump()
    return [f"{k}: recorded {want[k]!r}, decided {got[k]!r}" for k in want if want[k] != got[k]]


def decide_record(path: str | Path) -> tuple[Decision, StudyRecord]:
    rec = load_study_record(path)
    gates, tuples = record_gates(rec)
    return decide(gates, tuples, stated=True), rec


def record_report(path: str | Path) -> dict[str, Any]:
    decision, rec = decide_record(path)
    mismatches = expected_mismatches(decision, rec.expected)
    return {"record": str(path), "title": rec.title, "note": rec.note, "decision": decision.to_json(),
            "claims_md": render_claims_md(decision), "reproduces_expected": not mismatches,
            "mismatches": mismatches, "problems": [f"the record's conclusion differs: {m}" for m in mismatches]}


# --- a project --------------------------------------------------------------------------------


def required_tuples(params: Params) -> list[TupleRef]:
    return [TupleRef(model=params.model.name, layer=t.layer, site=t.site) for t in params.tuples]


def read_gates(paths: Paths) -> dict[str, GateRecord | None]:
    return {g: read_gate(paths.gate(g), gate=g) if paths.gate(g).is_file() else None for g in GATES}


def _stage_problems(paths: Paths, stage: str, outs: tuple[str, ...]) -> tuple[list[str], int]:
    """What is wrong with one stage's outputs on disk (its manifest, every out), and how many files it lists."""
    from .archive.dvcmeta import under

    manifest = paths.rel(paths.manifest(stage))
    problems = [] if manifest in outs else [f"dvc.yaml declares no manifest {manifest} for it"]
    for out in (o for o in outs if o != manifest):
        if not (paths.root / out).exists() or not any(iter_files(paths.root / out)):
            problems.append(f"out {out} is missing")
    if not paths.manifest(stage).is_file():
        return problems + [f"manifest {manifest} is missing"], 0
    try:
        listed = read_manifest(paths.manifest(stage)).files
        changed = verify_manifest(paths.manifest(stage), paths.root)
    except ArtifactError as exc:
        return problems + [str(exc)], 0
    problems += [f"{rel} differs from {manifest}" if (paths.root / rel).is_file()
                 else f"{rel} is missing (listed in {manifest})" for rel in changed]
    problems += [f"{manifest} lists {rel}, which is not an out of this stage"
                 for rel in sorted(listed) if not any(under(rel, o) for o in outs if o != manifest)]
    on_disk = {f.relative_to(paths.root).as_posix() for o in outs if o != manifest and (paths.root / o).exists()
               for f in iter_files(paths.root / o)}
    problems += [f"{rel} is not in {manifest}" for rel in sorted(on_disk - set(listed))]
    return problems, len(listed)


def _outputs(paths: Paths) -> dict[str, Any]:
    """Every stage dvc.yaml declares, checked against what is on disk: {stage: [problems]}, with counts.

    Per stage: its manifest (manifests/<stage>.json) exists and is well-formed, every out it
    declares exists, matches the manifest's sha256 and size and is listed in it; and each
    change `dvc status` reports for the stage (a deleted or modified out, a changed dep or
    param) is flagged too, so status and dvc agree on every out. Stray manifests (no stage
    declares them) are flagged under their own name.
    """
    from .archive.dvcmeta import declared_outs, dvc_status

    flagged: dict[str, list[str]] = {}
    errors: list[str] = []  # what belongs to no stage: an unreadable dvc.yaml, a stray manifest, dvc failing
    try:
        declared = declared_outs(paths.root)
    except ArtifactError as exc:
        declared, errors = {}, [str(exc)]
    files = manifests = 0
    for stage, outs in declared.items():
        problems, n = _stage_problems(paths, stage, outs)
        files, manifests = files + n, manifests + paths.manifest(stage).is_file()
        if problems:
            flagged[stage] = problems
    known = {paths.rel(paths.manifest(s)) for s in declared}
    errors += [f"{paths.rel(m)}: no stage in dvc.yaml declares it"
               for m in sorted(paths.manifest("-").parent.glob("*.json")) if paths.rel(m) not in known]
    try:
        changes = dvc_status(paths.root)
    except ArtifactError as exc:
        errors.append(str(exc))
        changes = []
    for c in changes:
        flagged.setdefault(c.stage, []).append(f"dvc status: {c.describe()}")
    return {"stages": len(declared), "manifests": manifests, "files": files, "flagged": flagged, "errors": errors}


def _preregistration(params: Params, paths: Paths) -> dict[str, Any]:
    from .preregistration import git_commit, read_preregistration, verify

    try:
        lock = read_preregistration(paths)
        if lock is None:
            return {"locked": False, "ok": False, "message": f"no preregistration at {paths.rel(paths.preregistration_lock)}"}
        verify(params, paths)
    except PreregistrationError as exc:
        return {"locked": paths.preregistration_lock.is_file(), "ok": False, "message": str(exc)}
    commit = lock.get("git_commit")
    head = git_commit(paths.root)
    return {"locked": True, "ok": True, "message": "the stop rules and protocol params match the preregistration",
            "git_commit": commit, "made_after": lock.get("made_after", {}),
            "commit_is_head": commit is not None and commit == head}


def _in_time(paths: Paths, tsa_cert: Path | None) -> tuple[InTime | None, dict[str, Any], list[str]]:
    """The lock's place in time and its timestamp: (facts for decide, the report's fields, problems)."""
    problems: list[str] = []
    facts = None
    try:
        facts = read_in_time(paths)
    except PreregistrationError as exc:
        problems.append(f"preregistration: {exc}")
    if facts is not None and facts.preregistered_after_results:
        problems.append(f"preregistration: {facts.text}")
    try:
        stamp = check_timestamp(paths, tsa_cert)
        timestamp = {"ok": True, "stamp": stamp.to_json() if stamp else None,
                     "message": f"{stamp.gen_time} by {stamp.tsa} over lock.json sha256 {stamp.sha256}" if stamp
                     else "none (sasgate preregister --tsa URL --tsa-cert FILE adds one)"}
    except TimestampError as exc:
        timestamp = {"ok": False, "stamp": None, "message": str(exc)}
        problems.append(f"preregistration timestamp: {exc}")
    return facts, {"in_time": facts.model_dump(mode="json") if facts else None, "timestamp": timestamp}, problems


def exit_code(report: dict[str, Any]) -> int:
    """0 nothing flagged; 12 a bad preregistration timestamp; 1 anything else flagged."""
    if report.get("preregistration", {}).get("timestamp", {}).get("ok") is False:
        return TimestampError.exit_code
    return 1 if report["problems"] else 0


def project_report(params: Params, paths: Paths, tsa_cert: Path | None = None) -> dict[str, Any]:
    """Everything `sasgate status` shows, as plain JSON, with a list of problems (empty: all consistent)."""
    problems: list[str] = []
    gates = read_gates(paths)
    derived: Decision | None = None
    in_time, in_time_report, in_time_problems = _in_time(paths, tsa_cert)
    try:
        derived = decide(gates, required_tuples(params), preregistration=in_time)
    except (ArtifactError, RecordConsistencyError) as exc:
        problems.append(f"no decision follows from the gate records: {exc}")
    on_disk = read_decision(paths.decision) if paths.decision.is_file() else None
    if on_disk is None:
        problems.append(f"{paths.rel(paths.decision)} is missing: run `dvc repro`")
    elif derived is not None and on_disk.to_json() != derived.to_json():
        problems.append(f"{paths.rel(paths.decision)} no longer follows from the gate records: run `dvc repro`")
    if on_disk is not None:
        md = paths.claims_md.read_text(encoding="utf-8") if paths.claims_md.is_file() else None
        if md != render_claims_md(on_disk):
            problems.append(f"{paths.rel(paths.claims_md)} is {'missing' if md is None else 'not the text decision.json renders (edited?)'}")
    artifacts = _outputs(paths)
    problems += artifacts["errors"]
    for stage, found in artifacts["flagged"].items():
        problems += [f"stage {stage}: {p}" for p in found]
    prereg = _preregistration(params, paths)
    if prereg["locked"] and not prereg["ok"]:  # goalposts moved after preregistration (no lock at all: not flagged)
        problems.append(f"preregistration: {prereg['message']}")
    prereg.update(in_time_report)
    problems += [p for p in in_time_problems if p not in problems]  # an unreadable lock is named once
    return {
        "decision": on_disk.to_json() if on_disk else None,
        "gates": {g: gate_summary(rec).model_dump() for g, rec in gates.items()},
        "artifacts": artifacts,
        "preregistration": prereg,
        "problems": problems,
    }


# --- the human report -------------------------------------------------------------------------


def _fig(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def format_decision(d: dict[str, Any] | None, gates: dict[str, Any]) -> list[str]:
    """The human report of a decision (None: not made yet) and the gates it rests on."""
    lines = ["decision: none yet (decision.json is missing)"] if d is None else [
        f"decision: {d['decision_state']} (active path {d['active_path']}, phase movement authorized: "
        f"{str(d['phase_movement_authorized']).lower()})"]
    if d and d.get("stopped_by"):
        s = d["stopped_by"]
        lines.append(f"  stopped by {s['id']} ({s['kind']}): {s['text']}")
    if d and d.get("coverage"):
        lines.append("  coverage: " + ", ".join(f"{f} = {t}" for f, t in d["coverage"].items()))
    lines.append("gates:")
    for name in [g for g in GATES if g in gates]:
        g = gates[name]
        thr = f"{g['metric']} {g['comparison']} {_fig(g['threshold'])}" if g["threshold"] is not None else "no threshold"
        outcome = f", outcome {g['outcome']}" if g.get("outcome") else ""
        lines.append(f"  {name:<15} {g['status']:<10} key figure {_fig(g['key_figure']):<8} ({thr}{outcome})")
        if g.get("reason"):
            lines.append(f"  {'':<15} {g['reason']}")
    if d is None:
        return lines
    lines.append("claims: " + f"{len(d['claims']['allowed'])} allowed, {len(d['claims']['disallowed'])} disallowed "
                 f"(disallowed: {', '.join(c['id'] for c in d['claims']['disallowed']) or 'none'})")
    if d["reopen_conditions"]:
        lines.append("reopen when:")
    for c in d["reopen_conditions"]:
        tuples = "; ".join(tuple_label(TupleRef.model_validate(t)) for t in c["required_tuples"])
        lines.append(f"  - ({c['kind']}) {c['text']}" + (f" [{tuples}]" if tuples else ""))
    return lines


def format_project(report: dict[str, Any]) -> str:
    lines = format_decision(report["decision"], report["gates"])
    a = report["artifacts"]
    lines.append(f"artifacts: {a['files']} files in {a['manifests']} manifests of {a['stages']} stages"
                 + (", all match (manifests and dvc status)" if not a["flagged"] and not a["errors"]
                    else ", FLAGGED: " + ", ".join([f"{s} ({len(f)})" for s, f in a["flagged"].items()]
                                                   + (["not checked: see the problems"] if a["errors"] else []))))
    p = report["preregistration"]
    lines.append(f"preregistration: {'ok' if p['ok'] else 'NOT OK'}: {p['message']}")
    if p.get("in_time"):
        lines.append(f"  {InTime.model_validate(p['in_time']).text}")
    lines.append(f"  timestamp: {'' if p['timestamp']['ok'] else 'BAD: '}{p['timestamp']['message']}")
    lines += [f"problem: {m}" for m in report["problems"]] or ["no problems: the decision follows from the records"]
    return "\n".join(lines)


def format_record(report: dict[str, Any]) -> str:
    d = report["decision"]
    lines = [f"study record: {report['record']}: {report['title']}", *format_decision(d, d["gates"])]
    lines.append("reproduces the study's recorded conclusion: " + ("yes" if report["reproduces_expected"] else "NO"))
    lines += [f"  differs: {m}" for m in report["mismatches"]]
    return "\n".join(lines) + "\n\n" + report["claims_md"]
