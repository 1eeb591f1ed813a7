"""`sasgate status`: the study record reproduced from its figures; a project's decision, gates and manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gate_records import behaviour, reconstruction, remediation, stability
from sasgate.artifacts import read_manifest, write_manifest
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
NO_CACHE = {"cache": False}
# a two-stage pipeline whose outputs the fixture writes itself; `dvc commit` records them in dvc.lock
DVC_YAML = {"stages": {
    "reconstruction": {"cmd": "true", "deps": ["params.yaml"],
                       "outs": [{"gates/reconstruction.json": NO_CACHE}, {"manifests/reconstruction.json": NO_CACHE}]},
    "decide": {"cmd": "true", "deps": ["gates/reconstruction.json"],
               "outs": [{"decision.json": NO_CACHE}, {"CLAIMS.md": NO_CACHE}, {"manifests/decide.json": NO_CACHE}]},
}}


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def project_template(tmp_path_factory) -> Path:
    """A real DVC project (no git), preregistered before its gate records were written (constructed); decide has
    run, dvc.lock committed."""
    from sasgate.preregistration import preregister

    root = tmp_path_factory.mktemp("status") / "project"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    paths = Paths.at(root)
    paths.stop_rules.parent.mkdir()
    shutil.copy(REPO / "preregistration" / "stop_rules.yaml", paths.stop_rules)
    preregister(parse_params(PARAMS), paths, "before the run")
    for rec in (behaviour(), stability(), reconstruction(0.163, 0.195), remediation("stopped", "K2")):
        write_gate(paths.gate(rec.gate), rec)
    write_manifest(paths.manifest("reconstruction"), "reconstruction", [paths.gate("reconstruction")], paths.root)
    decide_stage.run(parse_params(PARAMS), paths)
    dvc(root, "init", "--no-scm", "-q")
    dvc(root, "commit", "-f", "-q")
    return root


@pytest.fixture
def project(project_template, tmp_path) -> Paths:
    return Paths.at(shutil.copytree(project_template, tmp_path / "project"))


def problems_of(paths: Paths) -> list[str]:
    return project_report(parse_params(PARAMS), paths)["problems"]


def test_project_status_is_clean_after_decide(project):
    report = project_report(parse_params(PARAMS), project)
    assert report["decision"]["decision_state"] == "conditional_hold"
    assert report["gates"]["reconstruction"]["key_figure"] == 0.195
    assert report["artifacts"] == {"stages": 2, "manifests": 2, "files": 3, "flagged": {}, "errors": []}
    assert report["preregistration"]["ok"] is True
    assert report["preregistration"]["in_time"]["preregistered_after_results"] is False
    assert report["problems"] == []
    res = sasgate("status", cwd=project.root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "decision: conditional_hold" in res.stdout and "all match (manifests and dvc status)" in res.stdout


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
    assert "stage reconstruction: gates/reconstruction.json differs from manifests/reconstruction.json" in problems
    assert "stage decide: CLAIMS.md differs from manifests/decide.json" in problems
    assert "stage reconstruction: dvc status: changed outs: gates/reconstruction.json (modified)" in problems
    assert any("no decision follows" in p or "no longer follows" in p for p in problems)


@pytest.mark.parametrize("remove, named", [
    ("manifests/decide.json", ["stage decide: manifest manifests/decide.json is missing",
                               "stage decide: dvc status: changed outs: manifests/decide.json (deleted)"]),
    ("gates/reconstruction.json", ["stage reconstruction: out gates/reconstruction.json is missing",
                                   "stage reconstruction: gates/reconstruction.json is missing (listed in "
                                   "manifests/reconstruction.json)",
                                   "stage reconstruction: dvc status: changed outs: gates/reconstruction.json "
                                   "(deleted)"]),
])
def test_a_missing_manifest_or_out_is_flagged_naming_the_stage(project, remove, named):
    """The old status checked only the manifests that exist: a deleted one, with its outs, passed as clean."""
    (project.root / remove).unlink()
    problems = problems_of(project)
    for text in named:
        assert text in problems
    res = sasgate("status", cwd=project.root)
    assert res.returncode == 1 and f"problem: {named[0]}" in res.stdout


def test_an_out_rewritten_with_its_manifest_is_caught_by_dvc_lock(project):
    """Manifest and file agree (as when a stage is run by hand outside DVC), but dvc.lock does not."""
    rec = json.loads(project.gate("reconstruction").read_text())
    rec["reason"] = "rewritten by hand"
    project.gate("reconstruction").write_text(json.dumps(rec, sort_keys=True, indent=2) + "\n")
    write_manifest(project.manifest("reconstruction"), "reconstruction", [project.gate("reconstruction")],
                   project.root)
    problems = problems_of(project)
    assert "stage reconstruction: dvc status: changed outs: gates/reconstruction.json (modified)" in problems
    assert not any("differs from manifests" in p for p in problems)


def test_unlisted_and_foreign_files_and_stray_manifests_are_flagged(project):
    m = json.loads(project.manifest("decide").read_text())
    m["files"]["gates/behaviour.json"] = {"sha256": "0" * 64, "size": 1}  # another stage's file
    del m["files"]["CLAIMS.md"]
    project.manifest("decide").write_text(json.dumps(m))
    (project.root / "manifests" / "old_stage.json").write_text("{}")
    problems = problems_of(project)
    assert "stage decide: manifests/decide.json lists gates/behaviour.json, which is not an out of this stage" in problems
    assert "stage decide: CLAIMS.md is not in manifests/decide.json" in problems
    assert "manifests/old_stage.json: no stage in dvc.yaml declares it" in problems


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["files"]["CLAIMS.md"].update(size="12"), "files.CLAIMS.md.size"),
    (lambda m: m["files"]["CLAIMS.md"].pop("sha256"), "files.CLAIMS.md.sha256"),
    (lambda m: m.update(stage="other"), "stage"),
    (lambda m: m.update(extra=1), "extra"),
    (lambda m: m["files"].update({"../escape": m["files"]["CLAIMS.md"]}), "not a project-relative posix path"),
])
def test_a_malformed_manifest_is_an_error_naming_file_and_field(project, edit, field):
    m = json.loads(project.manifest("decide").read_text())
    edit(m)
    project.manifest("decide").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=f"manifests/decide.json: invalid manifest: .*{re.escape(field)}") as exc:
        read_manifest(project.manifest("decide"))
    assert exc.value.exit_code == 5
    assert any(p.startswith("stage decide: ") and field in p and "manifests/decide.json" in p
               for p in problems_of(project))


def test_a_stage_without_a_manifest_and_a_project_dvc_cannot_read_are_flagged(project):
    spec = yaml.safe_load((project.root / "dvc.yaml").read_text())
    spec["stages"]["decide"]["outs"] = [o for o in spec["stages"]["decide"]["outs"] if "manifests/decide.json" not in o]
    (project.root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    problems = problems_of(project)
    assert "stage decide: dvc.yaml declares no manifest manifests/decide.json for it" in problems
    shutil.rmtree(project.root / ".dvc")
    assert any(p.startswith("dvc status failed: ") for p in problems_of(project))
    (project.root / "dvc.yaml").unlink()
    assert "missing dvc.yaml: not the root of a DVC project" in problems_of(project)


def test_status_help_says_what_it_checks():
    from click.testing import CliRunner

    from sasgate.cli import main

    res = CliRunner().invoke(main, ["status", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "for every stage dvc.yaml declares, its manifest exists and is well-formed" in text
    assert "`dvc status` reports nothing (each problem names the stage)" in text and "Exit 1" in text


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


# --- the real pipeline: status against dvc status, and a killed `dvc repro` ----------------------


def out_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of every out dvc.yaml declares."""
    from sasgate.archive.dvcmeta import declared_outs
    from sasgate.artifacts import iter_files, sha256_file

    return {f.relative_to(root).as_posix(): sha256_file(f) for outs in declared_outs(root).values()
            for o in outs if (root / o).exists() for f in iter_files(root / o)}


def flagged_out_stages(root: Path) -> tuple[set[str], set[str]]:
    """(stages `sasgate status` flags for their own outs or manifest, stages `dvc status` lists with changed outs)."""
    from sasgate.archive.dvcmeta import dvc_status

    res = sasgate("status", "--json", cwd=root)
    report = json.loads(res.stdout)
    ours = {s for s, found in report["artifacts"]["flagged"].items()
            if any(not p.startswith("dvc status:") for p in found)}
    theirs = {c.stage for c in dvc_status(root) if c.kind == "changed outs"}
    return ours, theirs


FAULTS = {  # each one a change the old status passed as clean, or flagged under no stage
    "steer": lambda root: shutil.rmtree(root / "artifacts" / "steer"),  # a cached folder out
    "score": lambda root: (root / "artifacts" / "score" / "scores.jsonl").unlink(),  # a file inside one
    "model": lambda root: (root / "manifests" / "model.json").unlink(),  # a manifest
    "params": lambda root: (root / "artifacts" / "params_check.json").write_text('{"valid": true}\n'),  # cache: false
}


@pytest.mark.slow
def test_the_reproduced_project_is_clean(reproduced_small, tmp_path):
    from projects import copy_project

    root = copy_project(reproduced_small, tmp_path / "p")
    res = sasgate("status", cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    n = len(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    assert f"manifests of {n} stages, all match" in res.stdout and f"in {n} manifests" in res.stdout
    assert flagged_out_stages(root) == (set(), set())


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(FAULTS))
def test_status_agrees_with_dvc_status_on_every_out(reproduced_small, tmp_path, stage):
    from projects import copy_project

    root = copy_project(reproduced_small, tmp_path / "p")
    FAULTS[stage](root)
    ours, theirs = flagged_out_stages(root)
    assert stage in ours and ours == theirs, (ours, theirs)
    res = sasgate("status", cwd=root)
    assert res.returncode == 1 and f"problem: stage {stage}: " in res.stdout


def _stage_process(group: int, stage: str) -> bool:
    """Whether a process of the group runs `python -m sasgate.stages.<stage>`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == group and f"sasgate.stages.{stage}".encode() in cmd:
            return True
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the stage process")
def test_a_sigkilled_dvc_repro_is_flagged_naming_the_stage_and_a_rerun_restores_identical_outputs(
        reproduced_small, tmp_path):
    import signal
    import time

    from projects import copy_project, dvc, env

    root = copy_project(reproduced_small, tmp_path / "p")
    before, lock = out_hashes(root), (root / "dvc.lock").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "steer"], cwd=root,
                            env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not _stage_process(proc.pid, "steer") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # inside the stage: it has loaded its inputs and is generating
    assert proc.poll() is None, "steer finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # dvc repro and the stage, as a crash or the OOM killer would
    proc.wait()
    assert not (root / "artifacts" / "steer").exists()  # DVC deleted the outs before running the stage

    res = sasgate("status", "--json", cwd=root)
    assert res.returncode == 1
    problems = json.loads(res.stdout)["problems"]
    assert "stage steer: manifest manifests/steer.json is missing" in problems
    assert "stage steer: out artifacts/steer is missing" in problems
    ours, theirs = flagged_out_stages(root)
    assert ours == theirs == {"steer"}

    dvc(root, "repro")
    assert out_hashes(root) == before and (root / "dvc.lock").read_bytes() == lock
    assert sasgate("status", cwd=root).returncode == 0
