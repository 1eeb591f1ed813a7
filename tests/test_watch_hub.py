"""`sasgate watch` against the Hub imitation (tests/hubsim.py), with the real huggingface_hub client.

Required tuples: a conditional_hold decision for google/gemma-2-2b at L5/L10/L20 resid_post and
L12 resid_pre (covered directly, or through blocks.11.hook_resid_post). The first poll of a
state records the lock-time baseline (the `no_saes` Hub, whose gated repo refuses its config
download); each scenario is then polled.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

import gate_records
from hubsim import HubSim, hub_env, load_scenario, watch_command
from sasgate.decision import decide, write_decision
from sasgate.gates import GATE_SCHEMA, validate_gate

MODEL = "google/gemma-2-2b"
TUPLES = [{"model": MODEL, "layer": 5, "site": "resid_post"}, {"model": MODEL, "layer": 10, "site": "resid_post"},
          {"model": MODEL, "layer": 12, "site": "resid_pre"}, {"model": MODEL, "layer": 20, "site": "resid_post"}]
KEYS = ["L5.resid_post", "L10.resid_post", "L12.resid_pre", "L20.resid_post"]
WATCH = {"registry": False, "authors": ["google", "EleutherAI", "jbloom", "canrager", "fnlp"], "tags": ["sae_lens"],
         "searches": ["gemma-scope"], "retries": 1, "backoff_s": 0.0, "timeout_s": 10.0, "lock_timeout_s": 120.0}
GATED = "google/gemma-2-2b-gated-saes"  # in no_saes: tree public, config download refused without hf_granted


def _gate(name: str, status: str, rows: list | None = None, details: dict | None = None):
    return validate_gate({"schema": GATE_SCHEMA, "gate": name, "status": status, "metric": "nmse", "threshold": 0.12,
                          "comparison": "<=", "per_tuple": rows or [], "inputs": {}, "params": {},
                          "reason": name, "details": details})


def write_project(root: Path, tuples: list[dict] = TUPLES, watch: dict | None = None,
                  constraints: dict | None = None) -> Path:
    """params.yaml (watch settings, remediation constraints) and a conditional_hold decision.json for `tuples`."""
    root.mkdir(parents=True, exist_ok=True)
    params: dict = {"tuples": [{"layer": 1, "site": "resid_post"}], "watch": {**WATCH, **(watch or {})}}
    if constraints:
        params["remediation"] = {"constraints": constraints}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    rows = [{"tuple": t, "observed": 0.2, "ci95": [0.19, 0.21], "status": "fail"} for t in tuples]
    n = len(tuples)
    stopped = {"stopped_by": {"id": "K2", "kind": "coverage", "text": "no candidate"},
               "coverage": {"A": {"available": True, "covered": 0, "required": n, "text": f"0/{n}"}}}
    records = {"behaviour": gate_records.behaviour(tuple_ref=tuples[0]),
               "stability": gate_records.stability(tuple_ref=tuples[0]),
               "reconstruction": _gate("reconstruction", "fail", rows),
               "remediation": _gate("remediation", "fail", [{**r, "observed": None, "ci95": None} for r in rows],
                                    stopped)}
    decision = decide(records, tuples)
    assert decision.decision_state == "conditional_hold"
    write_decision(root / "decision.json", decision)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_project(tmp_path_factory.mktemp("watch_project"))


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

    def poll(self, scenario: str | dict | None = None, *extra: str, env: dict | None = None,
             stdout: object = subprocess.PIPE) -> tuple[subprocess.CompletedProcess, dict | None]:
        if scenario is not None:
            self.sim.set_scenario(scenario)
        res = subprocess.run(self.command("--json", *extra), cwd=self.root, env={**self.env, **(env or {})},
                             stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)
        report = json.loads(res.stdout) if res.returncode in (0, 10) and res.stdout else None
        return res, report

    def slept(self) -> list[float]:
        return json.loads((self.tmp / f"slept{self.runs}.json").read_text())

    def record(self) -> dict:
        return json.loads(self.state.read_text())


def start(root: Path, sim: HubSim, tmp: Path) -> Watcher:
    """A watcher whose first poll recorded the no_saes Hub as the lock-time baseline."""
    w = Watcher(root, sim, tmp)
    res, report = w.poll("no_saes")
    assert res.returncode == 0, res.stderr
    assert report["baseline_recorded"] == ["hub"] and report["coverage"]["text"] == f"0/{report['coverage']['required']}"
    return w


@pytest.fixture
def watcher(project, tmp_path):
    with HubSim("no_saes") as sim:
        yield start(project, sim, tmp_path)


def covering(report: dict) -> dict[str, list[str]]:
    return {t["key"]: [c["label"] for c in t["covering"]] for t in report["coverage"]["per_tuple"]}


def test_no_saes_reports_zero_coverage_and_why_repos_were_skipped(watcher):
    res, report = watcher.poll()
    assert res.returncode == 0 and report["coverage"]["text"] == "0/4" and not report["reopen"]["met"]
    skipped = "\n".join(report["coverage"]["skipped"])
    assert "canrager/unknown-layout-saes: no SAE layout sasgate reads" in skipped
    assert "google/gemma-2-2b: no SAE layout sasgate reads" in skipped
    assert (f"{GATED}/blocks.20.hook_resid_post/cfg.json: not readable: gated: no access with this token (HTTP 403); "
            "read again on every poll until it is") in skipped  # a skip, not an outage
    assert report["sources"]["hub"]["refused"] == [GATED]


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
    assert report["sources"]["hub"]["reread"] == [GATED, "jbloom/gemma-2-2b-res-saes"]  # the refused one: again
    assert report["new_since_last_poll"] == ["hub:jbloom/gemma-2-2b-res-saes/blocks.20.hook_resid_post"]
    rev = report["coverage"]["per_tuple"][3]["covering"][0]["revision"]
    assert rev == load_scenario("updated_in_place")["repos"][-1]["sha"]

    res, report = watcher.poll()  # told once: still met, exit 0
    assert res.returncode == 0 and report["reopen"]["met"] and not report["reopen"]["newly_met"]


def test_second_poll_with_nothing_changed_reads_only_the_refused_repo_again(watcher):
    res, _ = watcher.poll("three_of_four")
    assert res.returncode == 0 and watcher.sim.counts["tree"] >= 1 and watcher.sim.counts["file"] == 3
    watcher.sim.set_scenario("three_of_four")
    res, report = watcher.poll()
    assert res.returncode == 0 and report["coverage"]["text"] == "3/4"
    assert watcher.sim.counts["list"] >= 1 and watcher.sim.counts["file"] == 0
    assert dict(watcher.sim.by_repo) == {("tree", GATED): 1, ("head", GATED): 1}  # refused before: asked again
    assert report["new_since_last_poll"] == [] and report["sources"]["hub"]["reread"] == [GATED]


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
    assert res.stdout.startswith("sasgate watch: 3/4 required tuples of google/gemma-2-2b covered (hub); "
                                 "reopen condition not met")
    assert "model names resolved (transformer-lens aliases): gemma-2-2b = google/gemma-2-2b" in res.stdout
    assert "1 refused (gated, disabled, private or gone: read again next poll)" in res.stdout
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


# --- issue 14: access, outages, stalls, typed state, model identity, reporting, widths ---------


def test_a_gated_release_is_read_again_once_access_is_granted(watcher):
    """The baseline poll was refused the gated repo's config; its sha never changes. Without a token it stays a
    skip (read again each poll); with an authorised HF_TOKEN the same sha is read and its SAE counts."""
    res, report = watcher.poll("three_of_four")
    assert res.returncode == 0 and report["coverage"]["text"] == "3/4"
    assert report["sources"]["hub"]["refused"] == [GATED]
    assert watcher.record()["hub"]["repos"][GATED]["retry"].startswith("gated: no access with this token")
    res, report = watcher.poll(None, env={"HF_TOKEN": "hf_other"})  # a token the repo does not authorise
    assert res.returncode == 0 and report["sources"]["hub"]["refused"] == [GATED]
    res, report = watcher.poll(None, env={"HF_TOKEN": "hf_granted"})
    assert res.returncode == 10, res.stderr
    assert report["coverage"]["text"] == "4/4" and report["sources"]["hub"]["refused"] == []
    assert covering(report)["L20.resid_post"] == [f"{GATED}/blocks.20.hook_resid_post"]
    assert report["reopen"]["fresh_covering"][f"{MODEL}:L20.resid_post"] == [f"hub:{GATED}/blocks.20.hook_resid_post"]
    assert watcher.record()["hub"]["repos"][GATED]["retry"] is None
    watcher.sim.set_scenario("three_of_four")
    res, _ = watcher.poll(None, env={"HF_TOKEN": "hf_granted"})
    assert res.returncode == 0 and watcher.sim.by_repo[("tree", GATED)] == 0  # read now: not asked again


def test_disabled_private_and_deleted_repos_are_skips_read_again_never_an_outage(watcher):
    res, report = watcher.poll("refused_repos")
    assert res.returncode == 10, (res.returncode, res.stderr)  # the other release still reopens
    skipped = report["coverage"]["skipped"]
    reasons = {"someorg/disabled-saes": "disabled: Access to this resource is disabled (HTTP 403)",
               "someorg/private-saes": "not found, or private without access (HTTP 401)",
               "someorg/gone-saes": "not found, or private without access (HTTP 404)"}
    for repo, reason in reasons.items():
        assert f"{repo}: not readable: {reason}; read again on every poll until it is" in skipped
    assert report["sources"]["hub"]["refused"] == sorted([GATED, *reasons])
    res, report = watcher.poll("refused_repos")
    assert res.returncode == 0 and report["reopen"]["met"]  # reported once
    assert all(watcher.sim.by_repo[("tree", r)] == 1 for r in reasons)


@pytest.mark.parametrize("scenario, request_kind", [("stalled_list", "list"), ("stalled_tree", "tree"),
                                                    ("stalled_file", "file")])
def test_a_stalled_hub_gives_75_after_watch_timeout_s_with_no_retry(tmp_path, scenario, request_kind):
    """The imitation accepts the request and never answers (list) or stops mid-body (tree, file GET). The client's
    own timeout=None and retries (6 x timeout + 23 s, or 5 resumed downloads) are not what bounds it: one request,
    no retry sleep, exit 75 naming the bound; the state is untouched."""
    root = write_project(tmp_path / "project", watch={"timeout_s": 2.0})
    with HubSim("no_saes") as sim:
        w = start(root, sim, tmp_path)
        before = w.state.read_bytes()
        res, _ = w.poll(scenario)
        assert res.returncode == 75, (res.returncode, res.stderr)
        assert "no answer within watch.timeout_s = 2 s" in res.stderr and "not retried" in res.stderr
        assert w.slept() == [] and w.state.read_bytes() == before
        stalled = sim.counts[request_kind] if request_kind == "list" else \
            sim.by_repo[(request_kind, "canrager/gemma-2-2b-topk-saes")]
        assert stalled == 1, dict(sim.counts)


@pytest.mark.parametrize("edit, field", [
    (lambda s: s["reopen"].update(met="false"), "reopen.met"),
    (lambda s: s.update(polls="1"), "polls"),
    (lambda s: s["hub"]["repos"]["canrager/unknown-layout-saes"].update(sha=None), "hub.repos.canrager/unknown"),
    (lambda s: s["baseline"].update(hub="hub:x"), "baseline.hub"),
])
def test_a_typed_but_wrong_state_exits_2_naming_the_field_and_is_left_as_it_is(watcher, edit, field):
    state = watcher.record()
    edit(state)
    watcher.state.write_text(json.dumps(state))
    before = watcher.state.read_bytes()
    res, _ = watcher.poll("all_four_sae_lens")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert f"watch state {watcher.state}: " in res.stderr and field in res.stderr and "Traceback" not in res.stderr
    assert watcher.state.read_bytes() == before and watcher.sim.counts["list"] == 0


def test_a_version_1_state_keeps_its_lock_time_baseline_and_is_read_again(watcher):
    """A state written before typed records (schema /1): its baseline stands, its repos are read again."""
    res, _ = watcher.poll("three_of_four")
    v1 = watcher.record()
    v1["schema"] = "sasgate.watch_state/1"
    v1["baseline"] = {"hub": sorted(v1["seen"]["hub"])}  # as if three_of_four's SAEs existed at lock time
    for rec in v1["hub"]["repos"].values():
        del rec["parser"], rec["retry"]
    del v1["reopen"]["reported"]
    watcher.state.write_text(json.dumps(v1))
    res, report = watcher.poll("updated_in_place")
    assert res.returncode == 0, res.stderr  # only L20's SAE is new since the v1 lock time: not a reopen
    assert report["baseline_recorded"] == [] and report["coverage"]["text"] == "4/4"
    assert report["reopen"]["fresh_covering"] == {f"{MODEL}:{k}": [] for k in KEYS[:3]} | {
        f"{MODEL}:L20.resid_post": ["hub:jbloom/gemma-2-2b-res-saes/blocks.20.hook_resid_post"]}
    state = watcher.record()
    assert state["schema"] == "sasgate.watch_state/2" and state["baseline"] == v1["baseline"]
    assert watcher.sim.by_repo[("tree", "google/gemma-2-2b")] == 1  # every repo read again


def test_model_identity_aliases_owners_and_one_fresh_list_per_model(tmp_path):
    """Tuples L5.resid_post of two models. `gpt2-small` (an SAE's cfg) is transformer-lens's alias of `gpt2`;
    `someorg/gemma-2-2b` is not `google/gemma-2-2b`. One tuple covered must not make the other's key look met."""
    gpt2 = {"model": "gpt2", "layer": 5, "site": "resid_post"}
    root = write_project(tmp_path / "project", tuples=[TUPLES[0], gpt2])
    with HubSim("no_saes") as sim:
        w = start(root, sim, tmp_path)
        res, report = w.poll("aliases_and_owners")
        assert res.returncode == 0, res.stderr
        gemma_t, gpt2_t = report["coverage"]["per_tuple"]
        assert (gemma_t["id"], gpt2_t["id"]) == (f"{MODEL}:L5.resid_post", "gpt2:L5.resid_post")
        assert [(c["label"], c["model"], c["model_resolved"]) for c in gpt2_t["covering"]] == [
            ("jbloom/gpt2-small-res-saes/blocks.5.hook_resid_post", "gpt2-small", "gpt2")]
        assert gemma_t["covering"] == [] and [e["reason"] for e in gemma_t["excluded"]] == [
            "trained on someorg/gemma-2-2b, not google/gemma-2-2b: the same name under another owner is another model"]
        assert report["reopen"]["fresh_covering"] == {
            f"{MODEL}:L5.resid_post": [], "gpt2:L5.resid_post": ["hub:jbloom/gpt2-small-res-saes/blocks.5.hook_resid_post"]}
        assert report["coverage"]["text"] == "1/2" and not report["reopen"]["met"]
        sc = load_scenario("aliases_and_owners")
        sc["repos"] += load_scenario("all_four_sae_lens")["repos"]
        res, report = w.poll(sc)
        assert res.returncode == 10 and report["coverage"]["text"] == "2/2"


def test_a_report_that_does_not_reach_the_caller_keeps_the_reopen_pending(watcher):
    res, _ = watcher.poll("three_of_four")
    with open("/dev/full", "w") as full:  # every write fails (ENOSPC): the report never reaches the caller
        res, _ = watcher.poll("updated_in_place", stdout=full)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "could not write the report" in res.stderr and "stays pending" in res.stderr
    assert watcher.record()["reopen"] | {"since": None} == {"met": True, "since": None, "reported": False,
                                                           "notified": False}
    since = watcher.record()["reopen"]["since"]
    res, report = watcher.poll()
    assert res.returncode == 10 and report["reopen"]["newly_met"] and report["reopen"]["since"] == since
    res = subprocess.run(watcher.command(), cwd=watcher.root, env=watcher.env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and f"reopen condition still met (since {since})" in res.stdout


def test_gemma_scope_widths_are_powers_of_two_and_a_new_parser_version_reads_the_repo_again(tmp_path):
    """`width_65k` is 2^16 = 65536: it meets max_width 65536 (65 x 1024 = 66560 would not). A state whose
    descriptors an older parser wrote (parser 1, width 66560) is read again at the same sha and corrected."""
    root = write_project(tmp_path / "project", constraints={"max_width": 65536})
    with HubSim("no_saes") as sim:
        w = start(root, sim, tmp_path)
        res, report = w.poll("gemma_scope_65k")
        assert res.returncode == 10 and report["coverage"]["text"] == "4/4", res.stderr
        state = w.record()
        repo = state["hub"]["repos"]["google/gemma-scope-2b-pt-res"]
        assert {d["width"] for d in repo["descriptors"]} == {65536} and repo["parser"] == 2
        repo["parser"] = 1  # what the parser before this fix left: widths x 1024, so nothing was covered
        repo["descriptors"] = [{**d, "width": 66560} for d in repo["descriptors"]]
        state["reopen"] = {"met": False, "since": None, "reported": False, "notified": False}
        w.state.write_text(json.dumps(state))
        res, report = w.poll("gemma_scope_65k")
        assert res.returncode == 10 and report["coverage"]["text"] == "4/4", res.stderr
        assert sim.by_repo[("tree", "google/gemma-scope-2b-pt-res")] == 1
        assert {d["width"] for d in w.record()["hub"]["repos"]["google/gemma-scope-2b-pt-res"]["descriptors"]} \
            == {65536}
