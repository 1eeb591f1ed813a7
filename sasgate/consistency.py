"""Record consistency on read (ARCHITECTURE.md, "Record consistency"): a gate record must agree with itself,
with the required tuples and with the records it depends on, before any decision is made from it.

The schema (sasgate.gates) says a record is well formed; this module says it is *true to its own rows*:
a status that does not follow from the rows, a row set that misses or repeats a required tuple, an
outcome that does not follow from its comparisons, a remediation that "found" candidates for no failing
tuple. Every rule is recomputed from the record's own figures with the same functions the stages use
(`gates.compare`, `behaviour.three_valued`, `behaviour.overall`), so a hand-edited or stale record is
refused (RecordConsistencyError, exit 11) naming the record and the field, never decided.

A study record (`sasgate status --record`) carries no behaviour figures: `stated=True` accepts its
behaviour outcome and stability as stated (they are typed by a person and say so), and still checks
everything else.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .behaviour import COMPARED, overall, three_valued
from .errors import RecordConsistencyError
from .gates import GateRecord, TupleRef, compare

Key = tuple[str, int, str]


def _key(t: TupleRef) -> Key:
    return (t.model, t.layer, t.site)


def _fail(record: str, field: str, why: str) -> RecordConsistencyError:
    return RecordConsistencyError(f"{record} gate record, {field}: {why}")


def _rows_cover(rec: GateRecord, required: Sequence[TupleRef]) -> None:
    """Each required tuple exactly once, nothing else."""
    got = [_key(r.tuple) for r in rec.per_tuple]
    want = sorted(_key(t) for t in required)
    dup = sorted({k for k in got if got.count(k) > 1})
    if dup:
        raise _fail(rec.gate, "per_tuple", f"repeats tuple(s) {dup}")
    if sorted(got) != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise _fail(rec.gate, "per_tuple", f"must cover every required tuple exactly once: missing {missing}, "
                                           f"not required {extra}")


def _declared_criteria(rec: GateRecord) -> list[tuple[str, str, float]] | None:
    """nmse <= threshold, then the record's params' reconstruction.criteria; None when the params say nothing."""
    section = (rec.params or {}).get("reconstruction")
    if not isinstance(section, dict) or "criteria" not in section:
        return None
    extra = section["criteria"]
    if not isinstance(extra, list) or not all(isinstance(c, dict) and {"metric", "comparison", "threshold"} <= set(c)
                                              for c in extra):
        raise _fail(rec.gate, "params.reconstruction.criteria", "malformed: each needs metric, comparison, threshold")
    return [(rec.metric, str(rec.comparison), float(rec.threshold or 0.0))] + [
        (str(c["metric"]), str(c["comparison"]), float(c["threshold"])) for c in extra]


def check_reconstruction(rec: GateRecord, required: Sequence[TupleRef]) -> None:
    """Each row's status follows from its figure and from every criterion it names (each criterion's `pass` from
    its observed figure, that figure from the row's `metrics`); the criteria are the gate's own (nMSE against the
    threshold first, then the record's params' extra criteria); the gate passes iff every row passes."""
    _rows_cover(rec, required)
    if rec.status not in ("pass", "fail"):
        raise _fail(rec.gate, "status", f"{rec.status!r}: the reconstruction gate passes or fails")
    if rec.threshold is None or rec.comparison is None:
        raise _fail(rec.gate, "threshold", "a tuple gate needs its threshold and comparison")
    declared = _declared_criteria(rec)
    for i, row in enumerate(rec.per_tuple):
        where = f"per_tuple[{i}]"
        if row.observed is None:
            raise _fail(rec.gate, f"{where}.observed", "missing: a tuple's status must follow from a figure")
        want = "pass" if compare(row.observed, rec.comparison, rec.threshold) else "fail"
        if want == "pass" and row.status != "pass" and row.criteria is None:
            raise _fail(rec.gate, f"{where}.status", f"{row.status!r}, but {rec.metric} {row.observed:.6g} "
                                                     f"{rec.comparison} {rec.threshold} gives {want!r}")
        if want == "fail" and row.status != "fail":
            raise _fail(rec.gate, f"{where}.status", f"{row.status!r}, but {rec.metric} {row.observed:.6g} "
                                                     f"{rec.comparison} {rec.threshold} gives {want!r}")
        if row.criteria is None:
            if declared is not None and len(declared) > 1:
                raise _fail(rec.gate, f"{where}.criteria", f"missing, but the params declare criteria {declared[1:]}")
            continue
        metrics = row.metrics or {}
        named = [(c.metric, c.comparison, c.threshold) for c in row.criteria]
        if not named or named[0] != (rec.metric, rec.comparison, rec.threshold):
            raise _fail(rec.gate, f"{where}.criteria", f"must start with {rec.metric} {rec.comparison} "
                                                       f"{rec.threshold} (the preregistered criterion), got {named[:1]}")
        if declared is not None and named != declared:
            raise _fail(rec.gate, f"{where}.criteria", f"judges {named}, but the gate's criteria are {declared}")
        for j, c in enumerate(row.criteria):
            if c.metric not in metrics:
                raise _fail(rec.gate, f"{where}.criteria[{j}]", f"judges {c.metric!r}, which the row's metrics lack")
            if c.observed != metrics[c.metric]:
                raise _fail(rec.gate, f"{where}.criteria[{j}].observed",
                            f"{c.observed:.6g}, but the row's metrics say {c.metric} {metrics[c.metric]:.6g}")
            if c.passed != compare(c.observed, c.comparison, c.threshold):
                raise _fail(rec.gate, f"{where}.criteria[{j}].pass", f"{c.passed}, but {c.metric} {c.observed:.6g} "
                                                                     f"{c.comparison} {c.threshold} gives {not c.passed}")
        if row.criteria[0].observed != row.observed:
            raise _fail(rec.gate, f"{where}.criteria[0].observed", f"{row.criteria[0].observed:.6g}, but the row's "
                                                                   f"observed {rec.metric} is {row.observed:.6g}")
        want = "pass" if all(c.passed for c in row.criteria) else "fail"
        if row.status != want:
            failed = [c.metric for c in row.criteria if not c.passed]
            raise _fail(rec.gate, f"{where}.status", f"{row.status!r}, but its criteria give {want!r}"
                                                     + (f" (failed: {failed})" if failed else ""))
    want = "pass" if all(r.status == "pass" for r in rec.per_tuple) else "fail"
    if rec.status != want:
        raise _fail(rec.gate, "status", f"{rec.status!r}, but its rows give {want!r}")


def check_remediation(rec: GateRecord, recon: GateRecord | None, required: Sequence[TupleRef], stated: bool) -> None:
    _rows_cover(rec, required)
    if recon is None:
        raise _fail(rec.gate, "(record)", "present without the reconstruction record it remediates")
    failing = {_key(r.tuple) for r in recon.per_tuple if r.status == "fail"}
    if (rec.threshold, rec.comparison) != (recon.threshold, recon.comparison):
        raise _fail(rec.gate, "threshold", f"judges candidates by {rec.comparison} {rec.threshold}, but the "
                                           f"reconstruction gate by {recon.comparison} {recon.threshold}")
    if (rec.status == "not_needed") != (not failing):
        raise _fail(rec.gate, "status", f"{rec.status!r}, but the reconstruction record has {len(failing)} failing "
                                        "tuple(s)" + ("" if failing else ": nothing to remediate"))
    details = rec.details or {}
    for i, row in enumerate(rec.per_tuple):
        if _key(row.tuple) not in failing and row.status != "not_needed":
            raise _fail(rec.gate, f"per_tuple[{i}].status", f"{row.status!r} for a tuple that passed reconstruction")
        if _key(row.tuple) in failing and row.status not in ("pass", "fail"):
            raise _fail(rec.gate, f"per_tuple[{i}].status", f"{row.status!r} for a tuple that failed reconstruction")
    rows = [r for r in rec.per_tuple if _key(r.tuple) in failing]
    if rec.status == "pass":
        if details.get("stopped_by"):
            raise _fail(rec.gate, "details.stopped_by", "names a stop rule, but the record says candidates were found")
        bad = [i for i, r in enumerate(rec.per_tuple) if _key(r.tuple) in failing and
               (r.status != "pass" or (not stated and not (r.extra or {}).get("passing_candidate")))]
        if bad:
            raise _fail(rec.gate, f"per_tuple[{bad[0]}]", "'found' needs a passing candidate, named, for every "
                                                          "failing tuple")
    if rec.status == "fail":
        if not details.get("stopped_by"):
            raise _fail(rec.gate, "details.stopped_by", "status fail (stopped) but no stop rule is named")
        if all(r.status == "pass" for r in rows):
            raise _fail(rec.gate, "status", "'stopped' although every failing tuple has a passing candidate")


def check_behaviour(rec: GateRecord, required: Sequence[TupleRef], stated: bool) -> None:
    if any(_key(r.tuple) not in {_key(t) for t in required} for r in rec.per_tuple):
        raise _fail(rec.gate, "per_tuple", "names a tuple that is not required")
    comps = rec.comparisons or []
    if stated and not comps:
        return
    if not comps:
        raise _fail(rec.gate, "comparisons", "empty: an outcome must follow from comparisons")
    pairs = [(c.kind, c.operator) for c in comps]
    if sorted(pairs) != sorted(COMPARED):
        raise _fail(rec.gate, "comparisons", f"must hold each of {list(COMPARED)} exactly once, got {pairs}")
    margin = ((rec.params or {}).get("validity") or {}).get("margin")
    for i, c in enumerate(comps):
        if margin is not None and c.margin != margin:
            raise _fail(rec.gate, f"comparisons[{i}].margin", f"{c.margin}, but the record's params say {margin}")
        if c.arms["dim"].strength is None:
            want, why = "inconclusive", "no DIM strength within the side-effect budget"
        elif c.arms["sas"].strength is None:
            want, why = "fails", "no SAS strength within the side-effect budget"
        else:
            want, why = three_valued(c.ci, c.margin), f"CI {list(c.ci)} against -margin {-c.margin}"
        if c.outcome != want:
            raise _fail(rec.gate, f"comparisons[{i}].outcome", f"{c.outcome!r}, but {why} gives {want!r}")
    if rec.outcome != overall([c.outcome for c in comps]):
        raise _fail(rec.gate, "outcome", f"{rec.outcome!r}, but its comparisons give {overall([c.outcome for c in comps])!r}")
    checks = (rec.details or {}).get("checks")
    if not isinstance(checks, dict) or not checks or not all(isinstance(v, dict) and isinstance(v.get("pass"), bool)
                                                              for v in checks.values()):
        raise _fail(rec.gate, "details.checks", "missing or malformed: the status must follow from named checks")
    want_status = "pass" if all(v["pass"] for v in checks.values()) else "fail"
    if rec.status != want_status:
        raise _fail(rec.gate, "status", f"{rec.status!r}, but its checks give {want_status!r}")
    rules: list[tuple[str, bool]] = [
        ("admissible", all(c.arms["dim"].strength is not None for c in comps)),
        ("assay_sensitivity", all(c.effect_ci["dim"][0] > c.margin for c in comps)),
    ]
    minimum = ((rec.params or {}).get("validity") or {}).get("min_samples")
    if minimum is not None:
        rules.append(("min_samples", min(c.n_units for c in comps) >= minimum))
    for name, holds in rules:
        if name not in checks or checks[name]["pass"] != holds:
            raise _fail(rec.gate, f"details.checks.{name}", f"must be {holds} from the comparisons")
    agreement = checks.get("scorer_agreement", {})
    if not ({"observed", "threshold"} <= set(agreement)) or agreement["pass"] != compare(
            float(agreement["observed"]), ">=", float(agreement["threshold"])):
        raise _fail(rec.gate, "details.checks.scorer_agreement", "its pass does not follow from observed >= threshold")


def check_stability(rec: GateRecord, required: Sequence[TupleRef], stated: bool) -> None:
    if any(_key(r.tuple) not in {_key(t) for t in required} for r in rec.per_tuple):
        raise _fail(rec.gate, "per_tuple", "names a tuple that is not required")
    details = rec.details or {}
    cells, halves = details.get("cells"), details.get("split_half")
    if stated and cells is None:
        return
    if not isinstance(cells, list) or not cells or not all(isinstance(c, dict) and isinstance(c.get("agrees"), bool)
                                                           for c in cells):
        raise _fail(rec.gate, "details.cells", "missing, empty or malformed: the share must follow from cells")
    if not isinstance(halves, list) or len(halves) != 2 or not all(isinstance(h, dict) and isinstance(h.get("agrees"), bool)
                                                                   for h in halves):
        raise _fail(rec.gate, "details.split_half", "must hold two halves, each with agrees")
    share = sum(c["agrees"] for c in cells) / len(cells)
    observed = [r.observed for r in rec.per_tuple]
    if len(observed) != 1 or observed[0] is None or abs(observed[0] - share) > 1e-12:
        raise _fail(rec.gate, "per_tuple[0].observed", f"{observed}, but {len(cells)} cells give share {share:.6g}")
    if rec.threshold is None:
        raise _fail(rec.gate, "threshold", "missing")
    want = "pass" if compare(share, ">=", rec.threshold) and all(h["agrees"] for h in halves) else "fail"
    if rec.status != want:
        raise _fail(rec.gate, "status", f"{rec.status!r}, but its cells and halves give {want!r}")


def check_records(records: Mapping[str, GateRecord | None], required: Sequence[TupleRef], stated: bool = False) -> None:
    """Every present record true to itself and to the records it depends on; RecordConsistencyError otherwise."""
    recon = records.get("reconstruction")
    checkers: dict[str, Any] = {
        "behaviour": lambda r: check_behaviour(r, required, stated),
        "stability": lambda r: check_stability(r, required, stated),
        "reconstruction": lambda r: check_reconstruction(r, required),
        "remediation": lambda r: check_remediation(r, recon, required, stated),
    }
    for name, fn in checkers.items():
        rec = records.get(name)
        if rec is not None:
            fn(rec)
