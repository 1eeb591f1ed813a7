"""`sasgate watch` against the Hub imitation (tests/hubsim.py), with the real huggingface_hub client.

Required tuples: a conditional_hold decision for google/gemma-2-2b at L5/L10/L20 resid_post and
L12 resid_pre (covered directly, or through blocks.11.hook_resid_post). The first poll of a
state records the lock-time baseline (the `no_saes` Hub); each scenario is then polled.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from hubsim import HubSim, hub_env, load_scenario, watch_command
from sasgate.decision import decide, write_decision
from sasgate.gates import GATE_SCHEMA, validate_gate

MODEL = "google/gemma-2-2b"
TUPLES = [{"model": MODEL, "layer": 5, "site": "resid_post"}, {"model": MODEL, "layer": 10, "site": "resid_post"},
          {"model": MODEL, "layer": 12, "site": "resid_pre"}, {"model": MODEL, "layer": 20, "site": "resid_post"}]
KEYS = ["L5.resid_post", "L10.resid_post", "L12.resid_pre", "L20.resid_post"]
WATCH = {"registry": False, "authors": ["google", "EleutherAI", "jbloom", "canrager", "fnlp"], "tags": ["sae_lens"],
         "searches": ["gemma-scope"], "retries": 1, "backoff_s": 0.0, "timeout_s": 10.0, "lock_timeout_s": 120.0}


def _gate(name: str, status: str, rows: list | None = None, details: dict | None = None):
    return validate_gate({"schema": GATE_SCHEMA, "gate": name, "status": status, "metric": "nmse", "threshold": 0.12,
                          "comparison": "<=", "per_tuple": rows or [], "inputs": {}, "params": {},
                          "reason": name, "details": details})


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """params.yaml (watch settings) and a conditional_hold decision.json for the four gemma-2-2b tuples."""
    root = tmp_path_factory.mktemp("watch_project")
    (root / "params.yaml").write_text(yaml.safe_dump({"tuples": [{"layer": 1, "site": "resid_post"}], "watch": WATCH}))
    rows = [{"tuple": t, "observed": 0.2, "ci95": [0.19, 0.21], "status": "fail"} for t in TUPLES]
    stopped = {"stopped_by": {"id": "K2", "kind": "coverage", "text": "no candidate"},
               "coverage": {"A": {"available": True, "covered": 0, "required": 4, "text": "0/4"}}}
    records = {"behaviour": _gate("behaviour", "pass"), "stability": _gate("stability", "pass"),
               "reconstruction": _gate("reconstruction", "fail", rows),
               "remediation": _gate("remediation", "fail", [{**r, "observed": None, "ci95": None} for r in rows],
                                    stopped)}
    decision = decide(records, TUPLES)
    assert decision.decision_state == "conditional_hold"
    write_decision(root / "decision.json", decision)
    return root


class Watcher:
    def __init__(self, root: Path, sim: HubSim, tmp: Path):
        self.root, self.sim, self.tmp = root, sim, tmp
        self.state = tmp / "state" / "state.json"
        self.env = hub_env(sim.url, tmp / "hf_home")
        self.runs = 0

    def command(self, *extra: str) -> list[str]:
        self.runs += 1
        return watch_command(self.tmp / f"slept{self.runs}.json", "--decision", "decision.json", "--state",
                             str(self.state), *extra)

    def poll(self, scenario: str | dict | None = None, *extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
        if scenario is not None:
            self.sim.set_scenario(scenario)
        res = subprocess.run(self.command("--json", *extra), cwd=self.root, env=self.env, capture_output=True,
                             text=True, timeout=120)
        report = json.loads(res.stdout) if res.returncode in (0, 10) else None
        return res, report

    def slept(self) -> list[float]:
        return json.loads((self.tmp / f"slept{self.runs}.json").read_text())


@pytest.fixture
def watcher(project, tmp_path):
    with HubSim("no_saes") as sim:
        w = Watcher(project, sim, tmp_path)
        res, report = w.poll()
        assert res.returncode == 0, res.stderr
        assert report["baseline_recorded"] == ["hub"] and report["coverage"]["text"] == "0/4"
        yield w


def covering(report: dict) -> dict[str, list[str]]:
    return {t["key"]: [c["label"] for c in t["covering"]] for t in report["coverage"]["per_tuple"]}


def test_no_saes_reports_zero_coverage_and_why_repos_were_skipped(watcher):
    res, report = watcher.poll()
    assert res.returncode == 0 and report["coverage"]["text"] == "0/4" and not report["reopen"]["met"]
    skipped = "\n".join(report["coverage"]["skipped"])
    assert "canrager/unknown-layout-saes: no SAE layout sasgate reads" in skipped
    assert "google/gemma-2-2b: no SAE layout sasgate reads" in skipped
    assert "google/gemma-2-2b-gated-saes: not readable (GatedRepoError)" in skipped  # a skip, not an outage


def test_three_of_four_then_an_in_place_update_adds_the_last_tuple(watcher):
    res, report = watcher.poll("three_of_four")
    assert res.returncode == 0, res.stderr
    assert report["coverage"]["text"] == "3/4" and not report["reopen"]["met"]
    cov = covering(report)
    assert cov["L20.resid_post"] == []
    assert cov["L12.resid_pre"] == ["jbloom/gemma-2-2b-res-saes/blocks.11.hook_resid_post"]
    how = report["coverage"]["per_tuple"][2]["covering"][0]["how"]
    assert how.startswith("blocks.11.hook_resid_post = blocks.12.hook_resid_pre")
    assert len(report["new_since_last_poll"]) == 3

    res, report = watcher.poll("updated_in_place")  # same repo, new sha, one more SAE
    assert res.returncode == 10, res.stderr
    assert report["coverage"]["text"] == "4/4" and report["reopen"]["newly_met"]
    assert report["sources"]["hub"]["reread"] == ["jbloom/gemma-2-2b-res-saes"]
    assert report["new_since_last_poll"] == ["hub:jbloom/gemma-2-2b-res-saes/blocks.20.hook_resid_post"]
    rev = report["coverage"]["per_tuple"][3]["covering"][0]["revision"]
    assert rev == load_scenario("updated_in_place")["repos"][-1]["sha"]

    res, report = watcher.poll()  # told once: still met, exit 0
    assert res.returncode == 0 and report["reopen"]["met"] and not report["reopen"]["newly_met"]


def test_second_poll_with_nothing_changed_reads_no_tree_and_no_file(watcher):
    res, _ = watcher.poll("three_of_four")
    assert res.returncode == 0 and watcher.sim.counts["tree"] >= 1 and watcher.sim.counts["file"] == 3
    watcher.sim.counts.clear()
    res, report = watcher.poll()
    assert res.returncode == 0 and report["coverage"]["text"] == "3/4"
    counts = watcher.sim.counts
    assert counts["list"] >= 1 and counts["tree"] == 0 and counts["file"] == 0 and counts["head"] == 0, counts
    assert report["new_since_last_poll"] == [] and report["sources"]["hub"]["reread"] == []


@pytest.mark.parametrize("scenario, layout, labels", [
    ("all_four_sae_lens", "sae_lens", ["canrager/gemma-2-2b-topk-saes/blocks.12.hook_resid_pre"]),
    ("all_four_gemma_scope", "gemma_scope", ["google/gemma-scope-2b-pt-res/layer_11/width_16k/average_l0_80"]),
    ("all_four_sparsify", "sparsify", ["EleutherAI/sae-gemma-2-2b-32x/layers.11"]),
])
def test_a_new_release_covering_all_four_tuples_reopens(watcher, scenario, layout, labels):
    res, report = watcher.poll(scenario)
    assert res.returncode == 10, res.stderr
    assert report["coverage"]["text"] == "4/4" and report["reopen"]["newly_met"]
    assert covering(report)["L12.resid_pre"] == labels
    layouts = {c["id"]: c for t in report["coverage"]["per_tuple"] for c in t["covering"]}
    assert len(layouts) == 4
    state = json.loads(watcher.state.read_text())
    assert {d["layout"] for r in state["hub"]["repos"].values() for d in r["descriptors"]} == {layout}


def test_a_pickle_only_release_is_skipped_not_counted(watcher):
    res, report = watcher.poll("pickle_only")
    assert res.returncode == 0 and report["coverage"]["text"] == "0/4"
    skipped = [s for s in report["coverage"]["skipped"] if s.startswith("jbloom/gemma-2-2b-pickled-saes/")]
    assert len(skipped) == 4 and all("sae_weights.pt" in s and "refuses pickles" in s for s in skipped)
    assert watcher.sim.counts["file"] == 0  # nothing of a pickle-only repo is downloaded


@pytest.mark.parametrize("scenario, message, waits", [
    ("http500_page", "500", [1, 2, 4, 8, 8]),
    ("truncated_json", "JSONDecodeError", []),
    ("rate_limited", "429", [8.0] * 5),  # Retry-After: 7, plus the client's 1 s
])
def test_an_unreadable_hub_exits_75_and_leaves_the_state_byte_identical(watcher, scenario, message, waits):
    res, _ = watcher.poll("three_of_four")
    before = watcher.state.read_bytes()
    res, report = watcher.poll(scenario)
    assert res.returncode == 75, (res.returncode, res.stdout, res.stderr)
    assert report is None and res.stdout == ""
    assert "error: listing models" in res.stderr and message in res.stderr
    assert watcher.slept() == waits
    assert watcher.state.read_bytes() == before


def test_a_short_lived_429_is_waited_out_and_the_poll_completes(watcher):
    sc = load_scenario("rate_limited")
    sc["faults"][0]["times"] = 1
    res, report = watcher.poll(sc)
    assert res.returncode == 10 and report["coverage"]["text"] == "4/4"
    assert watcher.slept() == [8.0]


def test_two_concurrent_polls_both_finish_and_leave_one_complete_poll(watcher):
    watcher.sim.set_scenario("all_four_sae_lens")
    procs = [subprocess.Popen(watcher.command("--json"), cwd=watcher.root, env=watcher.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 10], results  # one saw the release first; told once
    state = json.loads(watcher.state.read_text())
    assert state["polls"] == 3 and state["reopen"]["met"]
    assert sorted(state["hub"]["repos"]) == sorted(r["id"] for r in load_scenario("all_four_sae_lens")["repos"])
    assert not list(watcher.state.parent.glob(".state.json.*.tmp"))


def test_other_layouts_gemma_scope_2_and_llama_scope(watcher):
    res, _ = watcher.poll("other_layouts")
    assert res.returncode == 0, res.stderr
    state = json.loads(watcher.state.read_text())
    found = {(d["layout"], d["model"], d["layer"], d["site"], d["width"])
             for r in state["hub"]["repos"].values() for d in r["descriptors"]}
    assert found == {("gemma_scope_2", "google/gemma-3-1b-pt", 5, "resid_post", 16384),
                     ("gemma_scope_2", "google/gemma-3-1b-pt", 9, "resid_post", 16384),
                     ("llama_scope", "meta-llama/Llama-3.1-8B", 5, "resid_post", 32768),
                     ("llama_scope", "meta-llama/Llama-3.1-8B", 9, "resid_post", 32768)}
    skipped = {s["where"] for r in state["hub"]["repos"].values() for s in r["skipped"]}
    assert "google/gemma-scope-2-1b-pt/transcoder/layer_5_width_16k_l0_small" in skipped


def test_human_report_and_bad_decision(watcher, project):
    watcher.sim.set_scenario("three_of_four")
    res = subprocess.run(watcher.command(), cwd=project, env=watcher.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("sasgate watch: 3/4 required tuples covered (hub); reopen condition not met")
    assert "L20.resid_post   not covered" in res.stdout
    bad = subprocess.run(watch_command(watcher.tmp / "s.json", "--decision", "missing.json", "--state",
                                       str(watcher.state)), cwd=project, env=watcher.env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "missing.json" in bad.stderr


def test_notify_url_gets_the_report_once_when_the_reopen_condition_is_newly_met(watcher):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posts: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        res, _ = watcher.poll("three_of_four", "--notify-url", url)
        assert res.returncode == 0 and posts == []
        res, _ = watcher.poll("updated_in_place", "--notify-url", "http://127.0.0.1:9/down")  # delivery fails
        assert res.returncode == 10 and "notification to http://127.0.0.1:9/down failed" in res.stderr
        res, report = watcher.poll(None, "--notify-url", url)  # still met, not yet delivered: delivered now
        assert res.returncode == 0 and len(posts) == 1 and report["reopen"]["notified"]
        assert posts[0]["reopen"]["met"] and posts[0]["coverage"]["text"] == "4/4"
        res, _ = watcher.poll(None, "--notify-url", url)
        assert res.returncode == 0 and len(posts) == 1  # once
    finally:
        server.shutdown()
