"""Hostile gate records (ARCHITECTURE.md, "Record consistency"): every record mutated the way a careless edit or a
reviewer trying to fool the gate would, each refused naming the record and the field, or decided exactly as its
rows say. None yields `advance`."""

from __future__ import annotations

import pytest

from gate_records import TUPLES, behaviour, reconstruction, remediation, stability
from sasgate.decision import decide
from sasgate.errors import RecordConsistencyError
from sasgate.gates import validate_gate


def mutate(rec, **changes):
    """A copy of the record with top-level fields replaced (validated by the real schema)."""
    raw = rec.to_json()
    raw.update(changes)
    return validate_gate(raw, origin="mutated")


def rows(rec, i=None, **changes):
    raw = rec.to_json()["per_tuple"]
    for j, r in enumerate(raw):
        if i is None or i == j:
            r.update(changes)
    return raw


def advancing():
    """The one record set that advances: every gate passes, remediation not needed."""
    return {"behaviour": behaviour(), "stability": stability(), "reconstruction": reconstruction(0.05, 0.06),
            "remediation": remediation("not_needed")}


def test_the_baseline_set_is_consistent_and_advances():
    assert decide(advancing(), TUPLES).decision_state == "advance"


def _refused(records, *named):
    with pytest.raises(RecordConsistencyError) as exc:
        decide(records, TUPLES)
    for n in named:
        assert n in str(exc.value)
    return str(exc.value)


def test_an_empty_reconstruction_record_with_status_pass_is_refused():
    recs = advancing()
    recs["reconstruction"] = mutate(recs["reconstruction"], per_tuple=[])
    _refused(recs, "reconstruction gate record", "per_tuple", "missing")


def test_a_missing_or_duplicated_tuple_is_refused():
    recs = advancing()
    recs["reconstruction"] = mutate(recs["reconstruction"], per_tuple=rows(recs["reconstruction"])[:1])
    _refused(recs, "per_tuple", "missing")
    recs = advancing()
    r = rows(recs["reconstruction"])
    recs["reconstruction"] = mutate(recs["reconstruction"], per_tuple=[r[0], r[0], r[1]])
    _refused(recs, "repeats tuple")
    recs = advancing()
    recs["remediation"] = mutate(recs["remediation"], per_tuple=rows(recs["remediation"])[1:])
    _refused(recs, "remediation gate record", "per_tuple")


def test_a_flipped_status_is_refused_on_the_row_and_on_the_gate():
    recs = {**advancing(), "reconstruction": reconstruction(0.05, 0.30), "remediation": remediation("stopped",
                                                                                                    failing=(1,))}
    assert decide(recs, TUPLES).decision_state == "conditional_hold"  # consistent: decided as its rows say
    flipped = mutate(recs["reconstruction"], per_tuple=rows(recs["reconstruction"], 1, status="pass"))
    _refused({**recs, "reconstruction": flipped}, "per_tuple[1].status", "gives 'fail'")
    flipped = mutate(recs["reconstruction"], status="pass")
    _refused({**recs, "reconstruction": flipped}, "reconstruction gate record, status")


def test_a_threshold_changed_in_the_record_is_refused():
    recs = {**advancing(), "reconstruction": reconstruction(0.05, 0.13), "remediation": remediation("stopped",
                                                                                                    failing=(1,))}
    moved = mutate(recs["reconstruction"], threshold=0.2)  # 0.13 now "fails" a threshold of 0.2 by its rows
    _refused({**recs, "reconstruction": moved}, "per_tuple[1].status", "0.2")
    moved = mutate(recs["remediation"], threshold=0.2)
    _refused({**recs, "remediation": moved}, "remediation gate record, threshold")


def test_remediation_found_needs_failing_tuples_and_named_candidates():
    recs = advancing()
    recs["remediation"] = remediation("found")  # reconstruction passed: "found" remediates nothing
    _refused(recs, "remediation gate record, status", "nothing to remediate")
    recs = {**advancing(), "reconstruction": reconstruction(0.30, 0.30)}
    bare = remediation("found")
    bare = mutate(bare, per_tuple=rows(bare, extra={}))
    _refused({**recs, "remediation": bare}, "passing candidate")
    assert decide({**recs, "remediation": remediation("found")}, TUPLES).decision_state == "rerun"
    stopped_without_rule = mutate(remediation("stopped"), details={"coverage": {}})
    _refused({**recs, "remediation": stopped_without_rule}, "stopped_by")


def test_a_behaviour_outcome_that_does_not_follow_from_its_comparisons_is_refused():
    recs = advancing()
    raw = recs["behaviour"].to_json()
    raw["comparisons"][0]["outcome"] = "holds"
    raw["comparisons"][0]["ci"] = [-0.3, -0.2]  # entirely below -margin: fails
    _refused({**recs, "behaviour": validate_gate(raw)}, "comparisons[0].outcome", "'fails'")
    recs = {**advancing(), "behaviour": behaviour(cis=((-0.3, -0.2), (-0.05, 0.05)))}
    assert recs["behaviour"].outcome == "fails"
    _refused({**recs, "behaviour": mutate(recs["behaviour"], outcome="holds")}, "behaviour gate record, outcome")


def test_no_admissible_setting_is_never_a_match():
    """Both arms unsteered would make both effects 0: SAS 'matches' DIM. No DIM strength is inconclusive and fails
    the gate; no SAS strength is a failed comparison, never a holding one."""
    rec = behaviour(dim_strength=None, sas_strength=None)
    assert rec.status == "fail" and rec.outcome == "inconclusive"
    assert decide({**advancing(), "behaviour": rec}, TUPLES).decision_state == "hold"
    raw = rec.to_json()
    raw["status"], raw["outcome"] = "pass", "holds"
    raw["details"]["checks"]["admissible"]["pass"] = True
    for c in raw["comparisons"]:
        c["outcome"] = "holds"
    _refused({**advancing(), "behaviour": validate_gate(raw)}, "comparisons[0].outcome", "no DIM strength")
    sas_none = behaviour(sas_strength=None)
    assert sas_none.outcome == "fails" and sas_none.status == "pass"


def test_behaviour_checks_must_follow_from_the_comparisons():
    weak = behaviour(dim_effect_ci=(0.02, 0.3))  # DIM barely steers: 'within the margin' would be vacuous
    assert weak.status == "fail"
    raw = weak.to_json()
    raw["status"] = "pass"
    raw["per_tuple"][0]["status"] = "pass"
    raw["details"]["checks"]["assay_sensitivity"]["pass"] = True
    _refused({**advancing(), "behaviour": validate_gate(raw)}, "details.checks.assay_sensitivity")
    raw = behaviour().to_json()
    raw["details"]["checks"]["scorer_agreement"]["observed"] = 0.5  # pass kept while the figure fails
    _refused({**advancing(), "behaviour": validate_gate(raw)}, "scorer_agreement")
    raw = behaviour().to_json()
    raw["details"]["checks"] = {}
    _refused({**advancing(), "behaviour": validate_gate(raw)}, "details.checks")
    raw = behaviour().to_json()
    raw["comparisons"] = []
    _refused({**advancing(), "behaviour": validate_gate(raw)}, "comparisons", "empty")


def test_stability_status_and_share_must_follow_from_cells_and_halves():
    recs = advancing()
    _refused({**recs, "stability": mutate(recs["stability"], details={"cells": []})}, "details.cells")
    assert stability(halves_agree=False).status == "fail"
    raw = stability(halves_agree=False).to_json()
    raw["status"] = "pass"
    _refused({**recs, "stability": validate_gate(raw)}, "stability gate record, status")
    raw = stability().to_json()
    raw["per_tuple"][0]["observed"] = 0.5
    _refused({**recs, "stability": validate_gate(raw)}, "observed")


def test_no_mutation_ever_advances():
    """A sweep over single-field flips of the advancing set: each is refused or decided as its rows say."""
    base = advancing()
    flips = [("reconstruction", {"status": "fail"}), ("reconstruction", {"threshold": 0.01}),
             ("remediation", {"status": "pass"}), ("remediation", {"status": "fail"}),
             ("behaviour", {"status": "fail"}), ("behaviour", {"outcome": "fails"}),
             ("stability", {"status": "fail"}), ("stability", {"threshold": 1.5})]
    for name, change in flips:
        recs = {**base, name: mutate(base[name], **change)}
        try:
            state = decide(recs, TUPLES).decision_state
        except RecordConsistencyError:
            continue
        assert state != "advance", (name, change)


# --- the reconstruction gate's criteria (issue 15): a row's status follows from every criterion it judged ---

def _judged_recs(kl_div=(0.995, 0.95)):
    from gate_records import reconstruction_judged

    recon = reconstruction_judged([0.05, 0.06], list(kl_div))
    failing = tuple(i for i, r in enumerate(recon.per_tuple) if r.status == "fail")
    rem = remediation("stopped", failing=failing) if failing else remediation("not_needed")
    return {**advancing(), "reconstruction": recon, "remediation": rem}


def _crit_rows(rec, i, j, **changes):
    raw = rec.to_json()["per_tuple"]
    raw[i]["criteria"][j].update(changes)
    return raw


def test_a_row_failing_an_extra_criterion_is_decided_as_failing():
    recs = _judged_recs()
    assert [r.status for r in recs["reconstruction"].per_tuple] == ["pass", "fail"]  # nMSE passes both
    assert decide(recs, TUPLES).decision_state == "conditional_hold"
    assert decide(_judged_recs((0.995, 0.999)), TUPLES).decision_state == "advance"


def test_a_row_claiming_pass_while_a_criterion_fails_is_refused():
    recs = _judged_recs()
    recon = recs["reconstruction"]
    flipped = mutate(recon, status="pass", per_tuple=rows(recon, 1, status="pass"))
    _refused({**recs, "reconstruction": flipped, "remediation": remediation("not_needed")}, "per_tuple[1].status",
             "its criteria give 'fail'", "kl_div_score")
    # ... or whose criterion says pass against its own figure
    lying = mutate(recon, status="pass", per_tuple=_crit_rows(mutate(recon, per_tuple=rows(recon, 1, status="pass")),
                                                              1, 1, **{"pass": True}))
    _refused({**recs, "reconstruction": lying, "remediation": remediation("not_needed")}, "per_tuple[1].criteria[1].pass")
    # ... or whose criterion quotes another figure than the row's metrics
    moved = mutate(recon, per_tuple=_crit_rows(recon, 1, 1, observed=0.999))
    _refused({**recs, "reconstruction": moved}, "per_tuple[1].criteria[1].observed")


def test_a_dropped_or_loosened_criterion_is_refused():
    recs = _judged_recs()
    recon = recs["reconstruction"]
    raw = rows(recon, 1, status="pass")
    raw[1]["criteria"] = raw[1]["criteria"][:1]  # the failing criterion left out of the row
    dropped = mutate(recon, status="pass", per_tuple=raw)
    _refused({**recs, "reconstruction": dropped, "remediation": remediation("not_needed")}, "per_tuple[1].criteria",
             "the gate's criteria are")
    loosened = _crit_rows(recon, 1, 1, threshold=0.9, **{"pass": True})
    loosened[1]["status"] = "pass"
    _refused({**recs, "reconstruction": mutate(recon, status="pass", per_tuple=loosened),
              "remediation": remediation("not_needed")}, "per_tuple[1].criteria", "the gate's criteria are")
    raw = rows(recon)
    for r in raw:
        r.pop("criteria")
        r["status"] = "pass"
    bare = mutate(recon, status="pass", per_tuple=raw)  # rows without criteria while the params declare one
    _refused({**recs, "reconstruction": bare, "remediation": remediation("not_needed")}, "per_tuple[0].criteria",
             "missing")


def test_a_criterion_naming_a_metric_the_row_lacks_is_refused():
    recs = _judged_recs()
    recon = recs["reconstruction"]
    raw = rows(recon)
    raw[0]["metrics"].pop("kl_div_score")
    _refused({**recs, "reconstruction": mutate(recon, per_tuple=raw)}, "per_tuple[0].criteria[1]", "lack")


def test_nan_metrics_are_refused_by_the_schema():
    from sasgate.errors import ArtifactError

    recon = _judged_recs()["reconstruction"].to_json()
    recon["per_tuple"][0]["metrics"]["kl_div_score"] = float("nan")
    with pytest.raises(ArtifactError, match="metrics"):
        validate_gate(recon)
    recon["per_tuple"][0]["metrics"]["kl_div_score"] = "0.99"
    with pytest.raises(ArtifactError, match="metrics"):
        validate_gate(recon)

