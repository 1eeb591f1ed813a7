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
from sasgate.stages.remediation import Candidate, Evaluation, Evaluator, search

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
    # an extra criterion added after preregistration (issue 15) is a changed protocol like a moved threshold
    ({"reconstruction": {"criteria": [{"metric": "kl_div_score", "comparison": ">=", "threshold": 0.99}]}},
     "params reconstruction.criteria: [] -> [{'metric': 'kl_div_score', 'comparison': '>=', 'threshold': 0.99}]"),
    ({"tuples": [{"layer": 0, "site": "resid_pre", "sae": "train"}]}, "params tuples:"),
    ({"remediation": {"families": {"A": {"source": "registry"}}}}, "params remediation.families.B removed"),
])
def test_changed_protocol_params_are_refused_naming_the_key(root, over, named):
    preregister(params(), Paths.at(root), "before")
    assert named in refused(root, params(**over))


def test_a_loosened_or_dropped_criterion_is_refused(root):
    """Criteria preregistered, then loosened or dropped: refused like a moved threshold."""
    crit = {"metric": "kl_div_score", "comparison": ">=", "threshold": 0.99}
    preregister(params(reconstruction={"criteria": [crit]}), Paths.at(root), "with a KL criterion")
    assert verify(params(reconstruction={"criteria": [crit]}), Paths.at(root))
    assert "params reconstruction.criteria" in refused(root, params(reconstruction={"criteria": [{**crit, "threshold": 0.9}]}))
    assert "params reconstruction.criteria" in refused(root, params())


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
    assert "preregistered 3 stop rules and 2 families" in res.stdout
    assert "preregistered before results: no gate record existed" in res.stdout
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


def test_a_candidate_without_a_loadable_form_is_recorded_not_evaluated(root):
    """Offline registry entries and npz/sparsify Hub releases have no spec: an error row, never a crash."""
    ev = Evaluator(params(), Paths.at(root))(Candidate("A", "L1.resid_post", "gemma-scope/layer_1", None))
    assert ev.status == "error" and "not evaluated" in ev.error


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


# --- family B, the Hub: searched when allowed, and "unavailable", never 0, when it cannot be read ---------


def hub_project(root: Path, hub_access: bool) -> Path:
    """A failed unlock on the toy's two tuples, preregistered; the remediation stage runs on it directly."""
    from gate_records import reconstruction

    from sasgate.gates import write_gate

    raw = {**PARAMS, "remediation": {"hub_access": hub_access},
           "watch": {"authors": ["google"], "tags": ["sae_lens"], "searches": [], "retries": 0, "backoff_s": 0.0,
                     "timeout_s": 10.0}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    paths = Paths.at(root)
    preregister(parse_params(raw), paths, "before remediation")
    write_gate(paths.gate("reconstruction"), reconstruction(0.3, 0.4))
    return root


def run_remediation(root: Path, env: dict[str, str]) -> dict:
    res = subprocess.run([sys.executable, "-m", "sasgate.stages.remediation"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads((root / "gates" / "remediation.json").read_text())


@pytest.mark.parametrize("scenario, b_text", [
    ("no_saes", "0/2"),  # the Hub answered: nothing for toy-refusal is a real 0/2
    ("truncated_json", "unavailable: hub unreachable (listing models (author=google): JSONDecodeError"),
])
def test_the_hub_family_is_searched_or_recorded_unavailable_never_a_silent_zero(root, tmp_path, scenario, b_text):
    """(The default, `remediation.hub_access: false`, is the end-to-end test's "unavailable" below.)"""
    from hubsim import HubSim, hub_env

    hub_project(root, hub_access=True)
    with HubSim(scenario) as sim:
        rec = run_remediation(root, hub_env(sim.url, tmp_path / "hf_home"))
        assert sim.counts["list"] > 0
    b = rec["details"]["coverage"]["B"]
    assert b["text"].startswith(b_text)
    assert b["available"] is (b_text == "0/2") and (b["covered"] == 0 if b["available"] else b["covered"] is None)
    assert rec["status"] == "fail" and rec["details"]["stopped_by"]["id"] == "K2"
    assert rec["details"]["coverage"]["A"]["text"] == "0/2"
    d = decide_records(root)
    assert ("family_unavailable" in [c.kind for c in d.reopen_conditions]) is (not b["available"])
    assert d.coverage["B"] == b["text"]


def test_hf_hub_offline_keeps_the_hub_family_unavailable(root, tmp_path):
    from hubsim import HubSim, hub_env

    hub_project(root, hub_access=True)
    with HubSim("no_saes") as sim:
        rec = run_remediation(root, {**hub_env(sim.url, tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"})
        assert sim.counts["list"] == 0
    assert rec["details"]["coverage"]["B"]["text"] == "unavailable: hub unreachable (HF_HUB_OFFLINE is set)"


def decide_records(root: Path):
    """The decision on this project's remediation record, with the behaviour level passing."""
    from sasgate.decision import decide
    from sasgate.status import read_gates, required_tuples

    from gate_records import behaviour, stability

    gates = read_gates(Paths.at(root)) | {"behaviour": behaviour("pass"), "stability": stability("pass")}
    return decide(gates, required_tuples(parse_params(yaml.safe_load((root / "params.yaml").read_text()))))


# --- end to end: the real `dvc repro` on the shared SMALL project, by params only ---------------------
#
# The session's `reproduced_small` (tests/conftest.py) is the failing case as it stands: its SAEs are
# tiny (SMALL params), miss the preregistered 0.12 by far, and remediation finds nothing for the toy.
# Every other variant copies it and changes params only, so `dvc repro` re-runs just the stages those
# params feed.


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


def stages_run(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


def variant(reproduced_small: Path, dest: Path, over: dict) -> tuple[Path, subprocess.CompletedProcess]:
    from projects import copy_project

    root = copy_project(reproduced_small, dest)
    set_params(root, over)
    return root, repro(root, check=False)


PASSING = {"reconstruction": {"threshold": 10.0}}  # far above any nMSE a trained SAE gives


@pytest.mark.slow
def test_failing_reconstruction_leads_through_k2_to_the_limitation_lock(reproduced_small, tmp_path):
    root = reproduced_small  # read only
    recon = json.loads((root / "gates" / "reconstruction.json").read_text())
    assert recon["status"] == "fail" and recon["threshold"] == 0.12
    assert all(t["status"] == "fail" for t in recon["per_tuple"])
    assert decision_of(root) == ("limitation_lock_for_current_phase", False, "conditional_hold")
    rem = json.loads((root / "gates" / "remediation.json").read_text())
    assert rem["status"] == "fail" and rem["details"]["stopped_by"]["id"] == "K2"
    assert rem["details"]["evaluated"] == []  # K2 stops before any evaluation
    cov = rem["details"]["coverage"]
    assert cov["A"]["text"] == "0/2" and cov["A"]["covered"] == 0  # the sae-lens registry has nothing for the toy
    assert cov["B"]["text"].startswith("unavailable: hub unreachable") and cov["B"]["covered"] is None
    d = json.loads((root / "decision.json").read_text())
    assert d["coverage"] == {"A": "0/2", "B": cov["B"]["text"]}
    assert [c["kind"] for c in d["reopen_conditions"]] == ["sae_coverage", "family_unavailable"]
    assert {t["layer"] for t in d["reopen_conditions"][0]["required_tuples"]} == {0, 1}
    assert {c["id"] for c in d["claims"]["disallowed"]} >= {"mechanism-sas-features", "causal-sas-features",
                                                            "phase-advance", "reconstruction-adequate"}
    md = (root / "CLAIMS.md").read_text()
    assert "## We cannot claim" in md and "stopped by: K2" in md and "candidate coverage: A = 0/2" in md
    # consistent, the overclaim guard passes the generated CLAIMS.md and catches a mechanism claim
    res = cli(root, "status")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "decision: conditional_hold" in res.stdout and "all match" in res.stdout
    assert cli(root, "claims", "lint", "CLAIMS.md").returncode == 0
    post = tmp_path / "post.md"
    post.write_text("Feature 3 encodes refusal.\n")
    res = cli(root, "claims", "lint", str(post))
    assert res.returncode == 1 and f"{post}:1: overclaim [mechanism-sas-features]" in res.stdout
    from projects import dvc

    assert "Data and pipelines are up to date" in dvc(root, "status").stdout


@pytest.mark.slow
def test_passing_reconstruction_authorizes_mechanism_claims(reproduced_small, tmp_path):
    root, res = variant(reproduced_small, tmp_path / "p", PASSING)
    assert res.returncode == 0, res.stdout + res.stderr
    assert stages_run(res.stdout) == ["params", "reconstruction", "remediation", "decide", "report"]  # params: the check
    assert decision_of(root) == ("mechanism_claims_authorized", True, "advance")
    rem = json.loads((root / "gates" / "remediation.json").read_text())
    assert rem["status"] == "not_needed" and rem["details"] is None
    d = json.loads((root / "decision.json").read_text())
    assert d["reopen_conditions"] == [] and d["stopped_by"] is None
    assert {c["id"] for c in d["claims"]["allowed"]} >= {"mechanism-sas-features", "causal-sas-features",
                                                         "phase-advance", "reconstruction-adequate"}
    (root / "post.md").write_text("Feature 3 encodes refusal.\n")
    assert cli(root, "claims", "lint", "post.md").returncode == 0  # allowed now
    # the threshold was preregistered at 0.12: status names the moved goalpost
    res = cli(root, "status")
    assert res.returncode == 1 and "params reconstruction.threshold: 0.12 -> 10.0" in res.stdout


@pytest.mark.slow
def test_failing_behaviour_gate_makes_the_behaviour_invalid(reproduced_small, tmp_path):
    root, res = variant(reproduced_small, tmp_path / "p", {"score": {"version": "v1"}})
    assert res.returncode == 0, res.stdout + res.stderr
    # the activations, SAEs and directions are kept; the strengths are chosen with the scorer, so from calibrate on
    ran = stages_run(res.stdout)
    assert "calibrate" in ran and not {"model", "collect", "saes", "directions", "features"} & set(ran), ran
    assert json.loads((root / "gates" / "behaviour.json").read_text())["status"] == "fail"
    assert decision_of(root) == ("behaviour_invalid", False, "hold")
    d = json.loads((root / "decision.json").read_text())
    assert [c["kind"] for c in d["reopen_conditions"]] == ["behaviour_gates"]
    assert "limitation-behaviour-invalid" in {c["id"] for c in d["claims"]["allowed"]}


@pytest.mark.slow
def test_stop_rules_changed_after_preregistration_stop_dvc_repro_at_remediation(reproduced_small, tmp_path):
    from projects import copy_project

    root = copy_project(reproduced_small, tmp_path / "p")
    edit_rules(root, lambda r: r["rules"][0]["parameters"].update(max_candidates=20))
    res = repro(root, check=False)
    assert res.returncode != 0
    assert stages_run(res.stdout) == ["remediation"]
    err = res.stdout + res.stderr
    assert "sasgate remediation: error: the remediation protocol changed after preregistration" in err
    assert "rule K1 parameters.max_candidates: 8 -> 20" in err
    assert not (root / "gates" / "remediation.json").exists()  # DVC removed the old record; nothing new written
