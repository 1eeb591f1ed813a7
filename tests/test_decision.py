"""The decision state machine: every row of ARCHITECTURE.md's table, the claim rules, determinism, the schema."""

from __future__ import annotations

import itertools
import json

import pytest

from gate_records import TUPLES, behaviour, gate, reconstruction, remediation, stability
from sasgate.artifacts import canonical_json, sha256_file
from sasgate.claims import BY_ID, CATALOGUE, FINDINGS, GATES
from sasgate.decision import (
    DECISION_SCHEMA,
    STATE_TABLE,
    decide,
    read_decision,
    record_sha256,
    render_claims_md,
    write_decision,
)
from sasgate.errors import ArtifactError, RecordConsistencyError
from sasgate.gates import write_gate

# ARCHITECTURE.md "The decision table", copied by hand: the code's table must say exactly this.
DESIGN_TABLE = [
    ("fail", "any", "any", "behaviour_invalid", False, "hold"),
    ("pass", "pass", "not_needed", "mechanism_claims_authorized", True, "advance"),
    ("pass", "fail", "found", "remediated_rerun_required", False, "rerun"),
    ("pass", "fail", "stopped", "limitation_lock_for_current_phase", False, "conditional_hold"),
]
RECON = {"pass": reconstruction(0.05, 0.08), "fail": reconstruction(0.163, 0.195), "absent": None}
REMED = {"not_needed": remediation("not_needed"), "found": remediation("found"), "absent": None,
         **{f"stopped:{k}": remediation("stopped", k) for k in ("K1", "K2", "K3")}}


def records(beh: str = "pass", stab: str = "pass", recon: str = "pass", remed: str = "not_needed") -> dict:
    return {"behaviour": None if beh == "absent" else behaviour(beh),
            "stability": None if stab == "absent" else stability(stab),
            "reconstruction": RECON[recon], "remediation": REMED[remed]}


def test_state_table_is_designs_table():
    assert [(r.behaviour, r.reconstruction, r.remediation, r.active_path, r.phase_movement_authorized,
             r.decision_state) for r in STATE_TABLE] == DESIGN_TABLE


# Every combination the table decides, each labelled with the row it must land on.
# Consistent (reconstruction, remediation) pairs: a remediation follows from the reconstruction it remediates.
CONSISTENT = [(rc, rm) for rc, rm in itertools.product(RECON, REMED)
              if rm == "absent" or (rc == "pass" and rm == "not_needed") or (rc == "fail" and rm != "not_needed")]
ROW_CASES = [
    # row 1: a failing or missing behaviour-level gate, whatever (consistent) reconstruction and remediation say
    *[(1, (b, s, rc, rm)) for b, s in (("fail", "pass"), ("pass", "fail"), ("absent", "pass"), ("pass", "absent"),
                                       ("fail", "fail"))
      for rc, rm in CONSISTENT],
    (2, ("pass", "pass", "pass", "not_needed")),
    (3, ("pass", "pass", "fail", "found")),
    *[(4, ("pass", "pass", "fail", f"stopped:{k}")) for k in ("K1", "K2", "K3")],
]


@pytest.mark.parametrize("row, case", ROW_CASES, ids=[f"row{r}-{'-'.join(c)}" for r, c in ROW_CASES])
def test_every_row_of_the_state_table(row, case):
    d = decide(records(*case), TUPLES)
    want = STATE_TABLE[row - 1]
    assert (d.state_row, d.active_path, d.phase_movement_authorized, d.decision_state) == (
        row, want.active_path, want.phase_movement_authorized, want.decision_state)


def test_every_row_has_a_case():
    assert {r for r, _ in ROW_CASES} == set(range(1, len(STATE_TABLE) + 1))


@pytest.mark.parametrize("case, error, named", [
    (("pass", "pass", "fail", "absent"), ArtifactError, "a gate record is missing"),
    (("pass", "pass", "absent", "absent"), ArtifactError, "a gate record is missing"),
    (("pass", "pass", "absent", "not_needed"), RecordConsistencyError, "without the reconstruction record"),
    (("pass", "pass", "fail", "not_needed"), RecordConsistencyError, "remediation gate record, status"),
    (("pass", "pass", "pass", "stopped:K2"), RecordConsistencyError, "remediation gate record, status"),
    (("pass", "pass", "pass", "found"), RecordConsistencyError, "nothing to remediate"),
    (("fail", "pass", "pass", "found"), RecordConsistencyError, "nothing to remediate"),  # row 1 too: refused
])
def test_records_no_row_matches_are_an_error_naming_why(case, error, named):
    with pytest.raises(error, match=named):
        decide(records(*case), TUPLES)


def test_stopped_by_and_coverage_come_from_the_remediation_record():
    d = decide(records(recon="fail", remed="stopped:K2"), TUPLES)
    assert d.stopped_by.id == "K2" and d.stopped_by.kind == "coverage"
    assert d.coverage == {"A": "0/2", "B": "unavailable: hub unreachable (test)"}


def test_conditional_hold_reopens_on_the_failing_tuples_and_on_unavailable_families():
    recs = records(recon="fail", remed="stopped:K2")
    recs["reconstruction"] = reconstruction(0.05, 0.2)  # only the second tuple fails
    recs["remediation"] = remediation("stopped", "K2", failing=(1,))
    d = decide(recs, TUPLES)
    kinds = [c.kind for c in d.reopen_conditions]
    assert kinds == ["sae_coverage", "family_unavailable"]
    assert [t.model_dump() for t in d.reopen_conditions[0].required_tuples] == [TUPLES[1]]
    assert "family B" in d.reopen_conditions[1].text


def test_every_state_says_what_would_reopen_it_except_advance():
    def kinds(case):
        return [c.kind for c in decide(records(*case), TUPLES).reopen_conditions]

    assert kinds(("fail", "pass", "pass", "not_needed")) == ["behaviour_gates"]
    assert kinds(("pass", "pass", "pass", "not_needed")) == []
    assert kinds(("pass", "pass", "fail", "found")) == ["rerun_with_candidates"]
    assert kinds(("pass", "pass", "fail", "stopped:K1")) == ["sae_coverage", "family_unavailable"]


# --- claims by rule ---------------------------------------------------------------------------


def allowed(d) -> set[str]:
    return {c.id for c in d.claims.allowed}


def test_behaviour_claims_need_validity_and_stability():
    both = allowed(decide(records(recon="fail", remed="stopped:K2"), TUPLES))
    assert {"behaviour-decision-valid", "behaviour-stable-as-tested"} <= both
    for beh, stab in (("fail", "pass"), ("pass", "fail"), ("pass", "absent")):
        d = decide(records(beh, stab, "fail", "stopped:K2"), TUPLES)
        assert not {"behaviour-decision-valid", "behaviour-stable-as-tested"} & allowed(d)
        assert "limitation-behaviour-invalid" in allowed(d)


def test_mechanism_and_causal_claims_need_reconstruction():
    for case, ok in ((("pass", "pass", "pass", "not_needed"), True), (("pass", "pass", "fail", "stopped:K1"), False),
                     (("pass", "pass", "fail", "found"), False), (("fail", "pass", "pass", "not_needed"), False)):
        got = allowed(decide(records(*case), TUPLES))
        assert ({"mechanism-sas-features", "causal-sas-features"} <= got) is ok, case
        assert bool({"mechanism-sas-features", "causal-sas-features"} & got) is ok, case


@pytest.mark.parametrize("declared, stable, ok", [(None, None, False), (0, 0, False), (4, 3, False), (2, 2, True)])
def test_robustness_is_claimed_only_for_the_tested_families_and_never_unconstrained(declared, stable, ok):
    """Old rule: every declared family stable allowed 'robust to rewording without restriction'. Now that claim is
    never allowed, and the scoped claim names each family with how it was made."""
    recs = records()
    recs["stability"] = stability("pass", declared, stable)
    assert recs["stability"].status == "pass"  # (4, 3): 8 of 10 cells agree, the gate passes, one family does not
    d = decide(recs, TUPLES)
    assert ("robustness-tested-families" in allowed(d)) is ok
    never = next(c for c in d.claims.disallowed if c.id == "robustness-unconstrained")
    assert "never allowed" in never.because and "no finite set" in never.because
    if ok:
        scoped = next(c for c in d.claims.allowed if c.id == "robustness-tested-families")
        assert "set 1: template 1 (held out from training: no; from selection: no)" in scoped.because
    recs["stability"] = stability("fail", declared, stable)
    assert not {"robustness-tested-families", "robustness-unconstrained"} & allowed(decide(recs, TUPLES))


@pytest.mark.parametrize("cis, outcome, claim", [
    (((-0.05, 0.05), (-0.02, 0.08)), "holds", "sas-matches-dim"),
    (((-0.05, 0.05), (-0.40, -0.20)), "fails", "sas-falls-short-of-dim"),
    (((-0.05, 0.05), (-0.15, -0.02)), "inconclusive", None),  # point estimate -0.085 >= -0.1: the old rule held
])
def test_the_outcome_claims_follow_the_three_valued_outcome(cis, outcome, claim):
    recs = {**records(recon="fail", remed="stopped:K2"), "behaviour": behaviour(cis=cis)}
    d = decide(recs, TUPLES)
    assert d.gates["behaviour"].outcome == outcome
    got = allowed(d) & {"sas-matches-dim", "sas-falls-short-of-dim"}
    assert got == ({claim} if claim else set())


def test_the_behaviour_gates_key_figure_is_what_its_metric_label_says():
    """Old record: metric 'scorer_agreement >= 0.95' printed next to the SAS - DIM difference."""
    recs = {**records(recon="fail", remed="stopped:K2"), "behaviour": behaviour(cis=((-0.9, -0.7), (-0.9, -0.7)))}
    g = decide(recs, TUPLES).gates["behaviour"]
    assert (g.metric, g.key_figure, g.threshold, g.outcome) == ("scorer_agreement", 0.99, 0.95, "fails")
    md = render_claims_md(decide(recs, TUPLES))
    assert "| behaviour | pass | 0.99 | scorer_agreement >= 0.95 | fails |" in md


@pytest.mark.parametrize("row, case", ROW_CASES[::7] + ROW_CASES[-5:])
def test_phase_advance_claim_is_exactly_phase_movement(row, case):
    d = decide(records(*case), TUPLES)
    assert ("phase-advance" in allowed(d)) is d.phase_movement_authorized


def test_every_finding_is_either_allowed_or_disallowed_and_limitations_only_when_they_hold():
    for _row, case in ROW_CASES:
        d = decide(records(*case), TUPLES)
        ids = [c.id for c in d.claims.allowed] + [c.id for c in d.claims.disallowed]
        assert len(ids) == len(set(ids))
        assert set(FINDINGS) <= set(ids)
        assert all(BY_ID[c.id].kind == "finding" for c in d.claims.disallowed)
    assert {c.id for c in CATALOGUE} == set(BY_ID) and all(set(c.rests_on) <= set(GATES) for c in CATALOGUE)


def test_the_study_state_claims_and_nothing_more():
    d = decide(records(recon="fail", remed="stopped:K2"), TUPLES)
    assert allowed(d) == {"behaviour-decision-valid", "behaviour-stable-as-tested", "sas-matches-dim",
                          "limitation-reconstruction", "limitation-remediation-stopped"}
    assert {c.id for c in d.claims.disallowed} == set(FINDINGS) - allowed(d)


# --- the record itself ------------------------------------------------------------------------


def test_gate_summaries_carry_status_key_figure_threshold_and_the_record_digest(tmp_path):
    recs = records(recon="fail", remed="stopped:K3", stab="absent")
    write_gate(tmp_path / "r.json", recs["reconstruction"])
    d = decide(recs, TUPLES)
    g = d.gates["reconstruction"]
    assert (g.status, g.key_figure, g.threshold, g.comparison) == ("fail", 0.195, 0.12, "<=")
    assert g.sha256 == record_sha256(recs["reconstruction"]) == sha256_file(tmp_path / "r.json")
    assert d.gates["stability"].status == "absent" and d.gates["stability"].sha256 is None
    assert list(d.gates) == list(GATES)


def test_decision_json_is_deterministic_and_round_trips(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_decision(a, decide(records(recon="fail", remed="stopped:K2"), TUPLES))
    write_decision(b, decide(records(recon="fail", remed="stopped:K2"), TUPLES))
    assert a.read_bytes() == b.read_bytes()
    raw = json.loads(a.read_text())
    assert raw["schema"] == DECISION_SCHEMA and canonical_json(raw) == a.read_text()
    assert read_decision(a) == decide(records(recon="fail", remed="stopped:K2"), TUPLES)
    assert not any(k in a.read_text() for k in ("time", "host", str(tmp_path)))


@pytest.mark.parametrize("edit, named", [
    (lambda r: r.update(extra_field=1), "extra_field"),
    (lambda r: r.pop("decision_state"), "decision_state"),
    (lambda r: r.update(decision_state="advance_anyway"), "decision_state"),
    (lambda r: r.update(schema="sasgate.decision/0"), "schema"),
])
def test_read_decision_validates(tmp_path, edit, named):
    path = tmp_path / "decision.json"
    write_decision(path, decide(records(), TUPLES))
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=named):
        read_decision(path)


def test_claims_md_has_the_four_sections_in_order_and_is_deterministic():
    d = decide(records(recon="fail", remed="stopped:K2"), TUPLES)
    md = render_claims_md(d)
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## We can claim", "## We cannot claim", "## What would reopen this work", "## Final state"]
    assert md == render_claims_md(decide(records(recon="fail", remed="stopped:K2"), TUPLES))
    for text in ("limitation_lock_for_current_phase", "conditional_hold", "K2", "A = 0/2", "0.195",
                 "toy-refusal layer 1 resid_post"):
        assert text in md


def test_decide_checks_its_inputs():
    with pytest.raises(RecordConsistencyError, match="per_tuple"):
        decide(records(), TUPLES[:1])
    with pytest.raises(ArtifactError, match="is the 'stability' gate"):
        decide({**records(), "behaviour": stability()}, TUPLES)
    with pytest.raises(ArtifactError, match="unknown gate records"):
        decide({**records(), "vibes": gate("vibes", "pass")}, TUPLES)
    bad = remediation("stopped")
    bad_details = {**bad.details, "stopped_by": None}
    with pytest.raises(RecordConsistencyError, match="stopped_by"):
        decide({**records(recon="fail"), "remediation": gate("remediation", "fail", per_tuple=[
            r.model_dump(mode="json") for r in bad.per_tuple], details=bad_details, metric="nmse", threshold=0.12,
            comparison="<=")}, TUPLES)
