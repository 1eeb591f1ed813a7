"""`sasgate status`: the study record reproduced from its figures; a project's decision, gates and manifests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gate_records import behaviour, reconstruction, remediation, stability
from sasgate.artifacts import write_manifest
from sasgate.errors import ArtifactError
from sasgate.gates import write_gate
from sasgate.params import parse_params
from sasgate.paths import Paths
from sasgate.stages import decide as decide_stage
from sasgate.status import decide_record, expected_mismatches, load_study_record, project_report, record_report

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "records" / "original-study.yaml"


def sasgate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sasgate.cli", *args], cwd=cwd, capture_output=True, text=True)


# --- the original study -------------------------------------------------------------------------


def test_original_study_yields_exactly_its_final_state_and_claim_lists():
    d, rec = decide_record(STUDY)
    assert (d.active_path, d.phase_movement_authorized, d.decision_state) == (
        "limitation_lock_for_current_phase", False, "conditional_hold")
    assert [c.id for c in d.claims.allowed] == rec.expected.allowed == [
        "behaviour-decision-valid", "behaviour-stable-as-tested", "sas-matches-dim", "limitation-reconstruction",
        "limitation-remediation-stopped"]
    assert [c.id for c in d.claims.disallowed] == rec.expected.disallowed
    assert {"mechanism-sas-features", "causal-sas-features", "phase-advance",
            "robustness-unconstrained"} <= set(rec.expected.disallowed)
    assert d.stopped_by.id == "K2" and d.coverage == {"A": "0/4", "B": "0/4"}
    assert len(d.reopen_conditions) == 1 and len(d.reopen_conditions[0].required_tuples) == 4
    g = d.gates["reconstruction"]
    assert g.status == "fail" and 0.163 <= g.key_figure <= 0.195 and g.threshold == 0.12
    assert expected_mismatches(d, rec.expected) == []


def test_record_statuses_come_from_the_figures(tmp_path):
    raw = yaml.safe_load(STUDY.read_text())
    for t in raw["gates"]["reconstruction"]["per_tuple"]:
        t["observed"] = 0.1  # all under 0.12: the unlock passes, nothing to remediate
    del raw["gates"]["remediation"]
    raw["gates"]["remediation"] = {"coverage": {"A": {"covered": 0, "required": 4}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    report = record_report(path)
    assert report["decision"]["decision_state"] == "advance"
    assert not report["reproduces_expected"] and any("decision_state" in m for m in report["mismatches"])
    res = sasgate("status", "--record", str(path), cwd=tmp_path)
    assert res.returncode == 1 and "reproduces the study's recorded conclusion: NO" in res.stdout


def test_status_record_cli_prints_the_decision_and_claims_md(tmp_path):
    res = sasgate("status", "--record", str(STUDY), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for text in ("decision: conditional_hold", "stopped by K2", "coverage: A = 0/4, B = 0/4",
                 "reconstruction  fail", "0.195", "nmse 0.163–0.195 above threshold 0.12 on 4/4 required tuples",
                 "reproduces the study's recorded conclusion: yes",
                 "## We cannot claim", "## What would reopen this work"):
        assert text in res.stdout
    out = json.loads(sasgate("status", "--record", str(STUDY), "--json", cwd=tmp_path).stdout)
    assert out["decision"]["decision_state"] == "conditional_hold" and out["claims_md"].startswith("# Claims")


@pytest.mark.parametrize("edit, named", [
    (lambda r: r.update(surprise=1), "surprise"),
    (lambda r: r["gates"]["reconstruction"].update(status="pass"), "figures give fail"),
    (lambda r: r["gates"]["behaviour"].pop("status"), "needs a status"),
])
def test_bad_records_are_refused(tmp_path, edit, named):
    raw = yaml.safe_load(STUDY.read_text())
    edit(raw)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ArtifactError, match=named):
        decide_record(path)
    assert load_study_record(STUDY).model == "google/gemma-2-2b-it"


# --- a project ----------------------------------------------------------------------------------

PARAMS = {"tuples": [{"layer": 0, "site": "resid_pre", "sae": "train"},
                     {"layer": 1, "site": "resid_post", "sae": "train"}]}


@pytest.fixture
def project(tmp_path) -> Paths:
    """A project preregistered before its gate records were written (constructed); its decide stage has run."""
    import shutil

    from sasgate.preregistration import preregister

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    paths = Paths.at(tmp_path)
    paths.stop_rules.parent.mkdir()
    shutil.copy(REPO / "preregistration" / "stop_rules.yaml", paths.stop_rules)
    preregister(parse_params(PARAMS), paths, "before the run")
    for rec in (behaviour(), stability(), reconstruction(0.163, 0.195), remediation("stopped", "K2")):
        write_gate(paths.gate(rec.gate), rec)
    write_manifest(paths.manifest("reconstruction"), "reconstruction", [paths.gate("reconstruction")], paths.root)
    decide_stage.run(parse_params(PARAMS), paths)
    return paths


def test_project_status_is_clean_after_decide(project):
    report = project_report(parse_params(PARAMS), project)
    assert report["decision"]["decision_state"] == "conditional_hold"
    assert report["gates"]["reconstruction"]["key_figure"] == 0.195
    assert report["artifacts"] == {"manifests": 2, "files": 3, "changed": {}}
    assert report["preregistration"]["ok"] is True
    assert report["preregistration"]["in_time"]["preregistered_after_results"] is False
    assert report["problems"] == []
    res = sasgate("status", cwd=project.root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "decision: conditional_hold" in res.stdout and "all match" in res.stdout


def test_an_edited_claims_md_and_a_changed_gate_record_are_flagged(project):
    md = project.claims_md.read_text()
    project.claims_md.write_text(md.replace("## We cannot claim", "## We cannot claim (much)"))
    rec = json.loads(project.gate("reconstruction").read_text())
    rec["status"] = "pass"
    project.gate("reconstruction").write_text(json.dumps(rec))
    res = sasgate("status", "--json", cwd=project.root)
    assert res.returncode == 1
    problems = json.loads(res.stdout)["problems"]
    assert any("CLAIMS.md" in p and "edited" in p for p in problems)
    assert any("artifacts changed" in p and "gates/reconstruction.json" in p for p in problems)
    assert any("no decision follows" in p or "no longer follows" in p for p in problems)


def test_status_without_a_decision_says_so(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    res = sasgate("status", cwd=tmp_path)
    assert res.returncode == 1
    assert "decision: none yet" in res.stdout and "decision.json is missing" in res.stdout


def test_a_protocol_changed_after_preregistration_is_flagged(project):
    assert project_report(parse_params(PARAMS), project)["problems"] == []
    moved = parse_params({**PARAMS, "reconstruction": {"threshold": 0.2}})  # the goalposts, after the fact
    problems = project_report(moved, project)["problems"]
    assert any(p.startswith("preregistration:") and "reconstruction.threshold: 0.12 -> 0.2" in p for p in problems)
