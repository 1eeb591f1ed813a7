"""Preregistration (the lock, and every kind of change it names) and the stop-rule search of `remediation`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sasgate.errors import PreregistrationError
from sasgate.params import parse_params
from sasgate.paths import Paths
from sasgate.preregistration import StopRules, load_stop_rules, preregister, verify
from sasgate.stages.remediation import Candidate, Evaluation, search

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"tuples": [{"layer": 0, "site": "resid_pre", "sae": "train"},
                     {"layer": 1, "site": "resid_post", "sae": "train"}]}


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "preregistration").mkdir()
    shutil.copy(REPO / "preregistration" / "stop_rules.yaml", tmp_path / "preregistration" / "stop_rules.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return tmp_path


def params(**over):
    raw = json.loads(json.dumps(PARAMS))
    for section, value in over.items():
        raw[section] = value
    return parse_params(raw)


def edit_rules(root: Path, fn) -> None:
    path = root / "preregistration" / "stop_rules.yaml"
    raw = yaml.safe_load(path.read_text())
    fn(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def refused(root: Path, p=None) -> str:
    with pytest.raises(PreregistrationError) as exc:
        verify(p or params(), Paths.at(root))
    assert exc.value.exit_code == 8
    return str(exc.value)


def test_shipped_stop_rules_are_valid_and_name_k1_k2_k3():
    rules = load_stop_rules(REPO / "preregistration" / "stop_rules.yaml")
    assert [(r.id, r.kind) for r in rules.rules] == [("K1", "budget"), ("K2", "coverage"), ("K3", "exhausted")]
    assert "8 candidate SAEs" in rules.rules[0].stated and "{" not in rules.rules[0].stated
    assert [f.id for f in rules.families] == ["A", "B"]


def test_shipped_lock_matches_the_shipped_protocol_on_the_default_params():
    from sasgate.params import load_params

    lock = verify(load_params(REPO / "params.yaml"), Paths.at(REPO))
    assert lock["stop_rules"]["path"] == "preregistration/stop_rules.yaml"
    assert lock["history"] and lock["history"][-1]["reason"]


def test_no_lock_is_refused(root):
    assert "no preregistration at preregistration/lock.json" in refused(root)


def test_preregister_then_verify_and_the_lock_keeps_history(root):
    paths = Paths.at(root)
    lock = preregister(params(), paths, "first")
    assert lock["git_commit"] is None and lock["made_after"] == {}  # not a git repo; no gate records yet
    assert verify(params(), paths)["sha256"] == lock["sha256"]
    assert verify(params(remediation={"hub_access": True}), paths)  # a run's network permission is not protocol
    lock2 = preregister(params(), paths, "again")
    assert [h["reason"] for h in lock2["history"]] == ["first", "again"]


@pytest.mark.parametrize("change, named", [
    (lambda r: r["rules"][0]["parameters"].update(max_candidates=20), "rule K1 parameters.max_candidates: 8 -> 20"),
    (lambda r: r["rules"].pop(2) and r["rules"].append({"id": "K3", "kind": "exhausted", "text": "Stop."}),
     "rule K3 text: "),
    (lambda r: r["rules"].insert(0, r["rules"].pop(1)), "rules reordered: K1, K2, K3 -> K2, K1, K3"),
    (lambda r: r["rules"].append({"id": "K4", "kind": "budget", "text": "x", "parameters": {"max_candidates": 1}}),
     None),  # invalid (a second budget rule): refused before any comparison
    (lambda r: r["families"][1].update(text="Anything we like."), "family B text: "),
    (lambda r: r["families"].pop(), "family B removed"),
])
def test_changed_stop_rules_are_refused_naming_the_difference(root, change, named):
    preregister(params(), Paths.at(root), "before")
    edit_rules(root, change)
    msg = refused(root)
    assert (named or "rule kinds repeat: budget") in msg


def test_a_comment_only_change_is_still_a_change(root):
    preregister(params(), Paths.at(root), "before")
    path = root / "preregistration" / "stop_rules.yaml"
    path.write_text(path.read_text() + "# an afterthought\n")
    assert "changed outside the rules (comments or formatting)" in refused(root)


@pytest.mark.parametrize("over, named", [
    ({"remediation": {"constraints": {"min_width": 1000}}}, "params remediation.constraints.min_width: None -> 1000"),
    ({"reconstruction": {"threshold": 0.2}}, "params reconstruction.threshold: 0.12 -> 0.2"),
    ({"tuples": [{"layer": 0, "site": "resid_pre", "sae": "train"}]}, "params tuples:"),
    ({"remediation": {"families": {"A": {"source": "registry"}}}}, "params remediation.families.B removed"),
])
def test_changed_protocol_params_are_refused_naming_the_key(root, over, named):
    preregister(params(), Paths.at(root), "before")
    assert named in refused(root, params(**over))


@pytest.mark.parametrize("rule, named", [
    ({"id": "K9", "kind": "budget", "text": "t"}, "takes parameters ['max_candidates']"),
    ({"id": "K9", "kind": "vibes", "text": "t"}, "rules.1.kind"),
    ({"id": "X1", "kind": "coverage", "text": "t"}, "rules.1.id"),
    ({"id": "K9", "kind": "coverage", "text": "stop at {n}"}, "unknown parameter"),
])
def test_invalid_stop_rules_are_refused(tmp_path, rule, named):
    raw = {"schema": "sasgate.stop_rules/1", "families": [{"id": "A", "text": "a"}],
           "rules": [{"id": "K3", "kind": "exhausted", "text": "t"}, rule]}
    path = tmp_path / "stop_rules.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PreregistrationError, match="invalid stop rules") as exc:
        load_stop_rules(path)
    assert named in str(exc.value)


def test_preregister_cli(root):
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    run = [sys.executable, "-m", "sasgate.cli", "preregister"]
    res = subprocess.run([*run, "--reason", "fixed before remediation"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "preregistered 3 stop rules and 2 families" in res.stdout and "no gate records" in res.stdout
    res = subprocess.run([*run, "--reason", " "], cwd=root, capture_output=True, text=True)
    assert res.returncode == 2 and "non-empty --reason" in res.stderr


# --- the search under the stop rules ------------------------------------------------------------

RULES = StopRules.model_validate(yaml.safe_load((REPO / "preregistration" / "stop_rules.yaml").read_text()))


def rules_with(max_candidates: int, order: tuple[str, ...] = ("K1", "K2", "K3")) -> StopRules:
    raw = RULES.model_dump(mode="json", by_alias=True)
    raw["rules"][0]["parameters"]["max_candidates"] = max_candidates
    raw["rules"] = sorted(raw["rules"], key=lambda r: order.index(r["id"]))
    return StopRules.model_validate(raw)


def cands(spec: dict[str, list[float]]) -> tuple[list[Candidate], dict[Candidate, float]]:
    out, nmse = [], {}
    for key, values in spec.items():
        for i, v in enumerate(values):
            c = Candidate("A", key, f"{key}#{i}", f"path:c/{key}/{i}")
            out.append(c)
            nmse[c] = v
    return out, nmse


def run_search(rules: StopRules, spec: dict[str, list[float]], keys=("t1", "t2")):
    candidates, nmse = cands(spec)
    seen: list[str] = []

    def evaluate_one(c: Candidate) -> Evaluation:
        seen.append(c.id)
        return Evaluation("pass" if nmse[c] <= 0.12 else "fail", nmse[c], (nmse[c], nmse[c]))

    return search(rules, list(keys), candidates, evaluate_one), seen


def test_k2_stops_before_any_evaluation_when_a_tuple_has_no_candidate():
    res, seen = run_search(rules_with(8), {"t1": [0.05]})
    assert res.stopped_by.id == "K2" and seen == []


def test_k1_stops_at_the_budget():
    res, seen = run_search(rules_with(2), {"t1": [0.3, 0.3, 0.3], "t2": [0.05]})
    assert res.stopped_by.id == "K1" and seen == ["t1#0", "t1#1"]


def test_k3_stops_when_every_candidate_failed():
    res, seen = run_search(rules_with(8), {"t1": [0.3, 0.05], "t2": [0.3]})
    assert res.stopped_by.id == "K3" and seen == ["t1#0", "t1#1", "t2#0"]
    assert res.passing == {"t1": Candidate("A", "t1", "t1#1", "path:c/t1/1"), "t2": None}


def test_passing_candidates_for_every_tuple_end_the_search_and_skip_the_rest():
    res, seen = run_search(rules_with(8), {"t1": [0.05, 0.01], "t2": [0.3, 0.1]})
    assert res.stopped_by is None and seen == ["t1#0", "t2#0", "t2#1"]
    assert {k: c.id for k, c in res.passing.items()} == {"t1": "t1#0", "t2": "t2#1"}


def test_rules_apply_in_their_preregistered_order():
    spec = {"t1": [0.05]}  # t2 uncovered (K2) and a zero budget (K1): the first listed rule is the one that stops
    assert run_search(rules_with(0), spec)[0].stopped_by.id == "K1"
    assert run_search(rules_with(0, ("K2", "K1", "K3")), spec)[0].stopped_by.id == "K2"


# --- end to end: the real `dvc repro` on a small project, by params only ---------------------------


def repro(root: Path, check: bool = True) -> subprocess.CompletedProcess:
    from projects import dvc

    return dvc(root, "repro", check=check)


def set_params(root: Path, over: dict) -> None:
    from projects import merge

    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merge(raw, over), sort_keys=False))


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    from projects import sh

    return sh([sys.executable, "-m", "sasgate.cli", *args], root, check=False)


def decision_of(root: Path) -> tuple[str, bool, str]:
    d = json.loads((root / "decision.json").read_text())
    return d["active_path"], d["phase_movement_authorized"], d["decision_state"]


FAILING = {"reconstruction": {"threshold": 1e-6}}  # no SAE reconstructs that well: the unlock fails


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small project whose reconstruction fails by params, preregistered after that, reproduced once.
    Variants copy it and change params: `dvc repro` then reruns only what changed."""
    from projects import SMALL, make_project, merge

    root = make_project(tmp_path_factory.mktemp("decision") / "proj", merge(SMALL, FAILING))
    # the shipped lock was made on the default tuples and threshold: a project with others preregisters again
    assert cli(root, "preregister", "--reason", "small test project").returncode == 0
    repro(root)
    return root


def variant(built: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "variant"
    shutil.copytree(built, dest, symlinks=True)
    return dest


@pytest.mark.slow
def test_failing_reconstruction_leads_through_k2_to_the_limitation_lock(built):
    assert decision_of(built) == ("limitation_lock_for_current_phase", False, "conditional_hold")
    rem = json.loads((built / "gates" / "remediation.json").read_text())
    assert rem["status"] == "fail" and rem["details"]["stopped_by"]["id"] == "K2"
    cov = rem["details"]["coverage"]
    assert cov["A"]["text"] == "0/2"  # the installed sae-lens registry has nothing for toy-refusal
    assert cov["B"]["text"].startswith("unavailable: hub unreachable") and cov["B"]["covered"] is None
    d = json.loads((built / "decision.json").read_text())
    assert [c["kind"] for c in d["reopen_conditions"]] == ["sae_coverage", "family_unavailable"]
    md = (built / "CLAIMS.md").read_text()
    assert "## We cannot claim" in md and "stopped by: K2" in md
    # consistent, and the overclaim guard passes the generated CLAIMS.md
    assert cli(built, "status").returncode == 0
    assert cli(built, "claims", "lint", "CLAIMS.md").returncode == 0
    assert "Data and pipelines are up to date" in repro(built).stdout


@pytest.mark.slow
def test_passing_reconstruction_authorizes_mechanism_claims(built, tmp_path):
    root = variant(built, tmp_path)
    set_params(root, {"reconstruction": {"threshold": 10.0}})
    out = repro(root).stdout
    assert "Running stage 'collect'" not in out and "Running stage 'steer'" not in out
    assert decision_of(root) == ("mechanism_claims_authorized", True, "advance")
    assert json.loads((root / "gates" / "remediation.json").read_text())["status"] == "not_needed"
    (root / "post.md").write_text("Feature 3 encodes refusal.\n")
    assert cli(root, "claims", "lint", "post.md").returncode == 0  # allowed now


@pytest.mark.slow
def test_failing_behaviour_gate_makes_the_behaviour_invalid(built, tmp_path):
    root = variant(built, tmp_path)
    set_params(root, {"validity": {"min_samples": 100000}})
    repro(root)
    assert decision_of(root) == ("behaviour_invalid", False, "hold")


@pytest.mark.slow
def test_stop_rules_changed_after_preregistration_stop_dvc_repro_at_remediation(built, tmp_path):
    root = variant(built, tmp_path)
    edit_rules(root, lambda r: r["rules"][0]["parameters"].update(max_candidates=20))
    res = repro(root, check=False)
    assert res.returncode != 0
    err = res.stdout + res.stderr
    assert "sasgate remediation: error: the remediation protocol changed after preregistration" in err
    assert "rule K1 parameters.max_candidates: 8 -> 20" in err
    assert not (root / "gates" / "remediation.json").exists()
