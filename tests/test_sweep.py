"""`sasgate sweep` (sasgate/sweep/): the grid, the refusals before submitting, point states, and a sweep end to
end through submitit's local executor on a two-stage DVC project (tests/sweep_project.py) with a bare git
remote and a DVC folder remote: hashes checked, a failed point listed with its log and resubmitted alone.
The sweep of the real pipeline is in tests/test_sweep_e2e.py."""

from __future__ import annotations

import json
import os
import shutil

import psutil
import pytest
import yaml
from click.testing import CliRunner
from projects import GIT_ENV, dvc, sh
from sweep_project import make

from sasgate.cli import main
from sasgate.errors import SweepError
from sasgate.sweep import executors, grid, record
from sasgate.sweep.job import lock_hashes
from sasgate.sweep.settings import SweepParams
from sasgate.sweep.sweeps import cached_outs

WAIT_S = "600"


@pytest.fixture
def project(tmp_path, monkeypatch):
    for k, v in GIT_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    root, git_remote, store = make(tmp_path)
    monkeypatch.chdir(root)
    return root, git_remote, store


def cli(*args: str):
    return CliRunner().invoke(main, ["sweep", *args], catch_exceptions=False)


def submit(*args: str):
    res = cli("submit", *args)
    assert res.exit_code == 0, res.output
    return res


def collect_json(*args: str):
    res = cli("collect", "--wait", "--timeout", WAIT_S, "--json", *args)
    return res.exit_code, json.loads(res.stdout) if res.stdout.strip().startswith("{") else res.output


# --- the grid ------------------------------------------------------------------------------------------


def test_grid_is_the_product_of_the_overrides_in_dvc_order():
    assert grid.expand(["features.top_k=2,6", "eval.seed=1,2"]) == [
        ["features.top_k=2", "eval.seed=1"], ["features.top_k=2", "eval.seed=2"],
        ["features.top_k=6", "eval.seed=1"], ["features.top_k=6", "eval.seed=2"]]
    assert grid.expand(["features.top_k=range(2,5)"]) == [[f"features.top_k={k}"] for k in (2, 3, 4)]
    assert grid.expand(["features.top_k=4"]) == [["features.top_k=4"]]


@pytest.mark.parametrize("overrides, message", [
    ([], "at least one -S"),
    (["other.yaml:a=1,2"], "params.yaml keys only"),
    (["features.top_k=2,2"], "same point twice"),
    (["features.top_k=(2"], "cannot parse"),
])
def test_grid_refuses_what_it_cannot_sweep(overrides, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(")):
        grid.expand(overrides)


@pytest.mark.parametrize("point, message", [
    (["features.top_k=0"], "features.top_k = 0"),                  # the sasgate schema refuses it
    (["features.topk=3"], "topk"),                                 # a key params.yaml does not have
    (["runtime.omp_wait_policy=spin"], "runtime.omp_wait_policy"),
])
def test_each_point_is_validated_before_anything_is_submitted(tmp_path, point, message):
    from projects import REPO

    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(SweepError, match=message):
        grid.check_point(tmp_path, point)
    grid.check_point(tmp_path, ["features.top_k=6"])  # a valid point passes


def test_cached_outs_leave_out_the_ones_git_carries():
    text = "stages:\n  a:\n    outs: [x, {y: {cache: false}}]\n    metrics: [{m.json: {cache: false}}]\n" \
           "    plots: [{p.json: {cache: true}}]\n"
    assert cached_outs(text) == {"a:x", "a:p.json"}


# --- the record ----------------------------------------------------------------------------------------


def _record() -> record.SweepRecord:
    remote = record.Remote(name="r", url="/x")
    return record.SweepRecord(id="s1", commit="c" * 40, git_remote=remote, dvc_remote=remote, settings=SweepParams(),
                              points=[record.Point(index=0, name="s1-p0", overrides=["a=1"],
                                                   attempts=[record.Attempt(job_id="1", submitted="t")])])


def test_record_round_trips_and_refuses_a_broken_one(tmp_path):
    path = record.write(tmp_path, _record())
    assert record.read(tmp_path, None) == record.read(tmp_path, "s1") == _record()
    raw = json.loads(path.read_text())
    for broken, message in [({**raw, "schema": "other/1"}, "not a sasgate.sweep/1"),
                            ({**raw, "points": []}, "inconsistent"),
                            ({**raw, "id": "s2"}, "inconsistent"),
                            ({**raw, "extra": 1}, "invalid sweep record")]:
        path.write_text(json.dumps(broken))
        with pytest.raises(SweepError, match=message):
            record.read(tmp_path, "s1")
    path.write_text("{")
    with pytest.raises(SweepError, match="unreadable"):
        record.read(tmp_path, "s1")
    with pytest.raises(SweepError, match="no sweep 'nope'"):
        record.read(tmp_path, "nope")
    with pytest.raises(SweepError, match="no sweep in"):
        record.read(tmp_path / "empty", None)


# --- point states, from real submitit local jobs -------------------------------------------------------


def test_point_states_come_from_what_outlives_the_submitter(tmp_path):
    import operator
    import time

    ex = executors.executor(SweepParams(time_min=5), tmp_path, "t")
    ok, boom, sleeper = ex.submit(dict, [("fine", True)]), ex.submit(operator.truediv, 1, 0), ex.submit(time.sleep, 600)
    ok.wait()
    boom.wait()
    got = {j.job_id: executors.state("local", tmp_path, j.job_id) for j in (ok, boom, sleeper)}
    assert got[ok.job_id].state == "succeeded" and got[ok.job_id].result == {"fine": True}
    assert got[boom.job_id].state == "failed" and "division by zero" in got[boom.job_id].error
    assert got[boom.job_id].err_log.is_file() and "ZeroDivisionError" in got[boom.job_id].err_log.read_text()
    assert got[sleeper.job_id].state == "running"
    controller = psutil.Process(int(sleeper.job_id))
    for proc in [*controller.children(recursive=True), controller]:  # the job dies without writing a result:
        proc.kill()                                                   # failed, never "running" forever
    os.waitpid(controller.pid, 0)
    dead = executors.state("local", tmp_path, sleeper.job_id)
    assert dead.state == "failed" and "without a result" in dead.error


# --- submit refuses what would not compute the commit the user sees -----------------------------------


@pytest.mark.slow  # a DVC project with remotes (seconds on a quiet machine), jobs through submitit
def test_submit_refuses_a_dirty_tree_an_unpushed_commit_and_missing_remotes(project):
    root, git_remote, store = project
    (root / "step.py").write_text((root / "step.py").read_text() + "# edited\n")
    res = cli("submit", "-S", "features.top_k=2,6")
    assert res.exit_code == SweepError.exit_code and "uncommitted changes" in res.output and "step.py" in res.output
    sh(["git", "commit", "-qam", "edit"], root)
    res = cli("submit", "-S", "features.top_k=2,6")
    assert res.exit_code == 14 and "not on the git remote 'origin'" in res.output
    sh(["git", "reset", "-q", "--hard", "HEAD~1"], root)

    res = cli("submit", "-S", "features.top_k=2,6", "--git-remote", "elsewhere")
    assert res.exit_code == 14 and "no git remote 'elsewhere'" in res.output
    res = cli("submit", "-S", "features.top_k=2,6", "--dvc-remote", "nope")
    assert res.exit_code == 14 and "no DVC remote 'nope'" in res.output
    res = cli("submit", "-S", "features.top_k=0,6")
    assert res.exit_code == 14 and "features.top_k = 0" in res.output
    shutil.rmtree(store)  # the outputs the jobs would pull are not on the DVC remote
    res = cli("submit", "-S", "features.top_k=2,6")
    assert res.exit_code == 14 and "lacks" in res.output and "dvc push -r store" in res.output
    assert not (root / "sweeps").exists(), "nothing submitted, nothing written"


@pytest.mark.slow  # a DVC project with remotes (seconds on a quiet machine), jobs through submitit
def test_submit_refuses_a_baseline_that_is_not_reproduced(project):
    root, _, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["eval"]["seed"] = 99
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "commit", "-qam", "seed 99, not reproduced"], root)
    sh(["git", "push", "-q", "origin", "main"], root)
    res = cli("submit", "-S", "features.top_k=2,6")
    assert res.exit_code == 14 and "not reproduced" in res.output and "first" in res.output


# --- end to end through the local executor --------------------------------------------------------------


@pytest.mark.slow  # a DVC project with remotes (seconds on a quiet machine), jobs through submitit
def test_two_point_sweep_comes_back_with_the_hashes_its_jobs_computed(project, monkeypatch):
    root, _, _ = project
    monkeypatch.setenv("SWEEP_TEST_BREAK", "top_k=6")  # point 1's stage fails on its node
    submit("-S", "features.top_k=2,6", "--time-min", "20")
    rec = record.read(root / "sweeps", None)
    assert [p.overrides for p in rec.points] == [["features.top_k=2"], ["features.top_k=6"]]

    code, out = collect_json()
    assert code == 14, out
    p0, p1 = out["points"]
    assert p0["state"] == "succeeded" and p1["state"] == "failed"
    assert "broken on purpose for top_k=6" in open(p1["log"]).read(), "the failed point's log says why"
    assert "dvc exp run" in p1["error"]
    assert p0["result"]["stages_run"] == ["second"], "only the stage features.top_k reaches reruns"
    res = cli("status")
    assert res.exit_code == 14 and "p1" in res.output and "log:" in res.output and p1["log"] in res.output
    assert "1 of 2 points failed" in res.output and f"sasgate sweep resubmit {rec.id}" in res.output

    res = cli("resubmit", "--point", "0")
    assert res.exit_code == 14 and "only failed points" in res.output
    monkeypatch.delenv("SWEEP_TEST_BREAK")
    res = cli("resubmit")
    assert res.exit_code == 0 and res.output.startswith("p1 ") and "attempt 2" in res.output, res.output
    code, out = collect_json()
    assert code == 0, out
    rec = record.read(root / "sweeps", None)
    assert [len(p.attempts) for p in rec.points] == [1, 2], "point 0 was not run again"

    for point, top_k in zip(out["points"], (2, 6)):
        res = point["result"]
        ref = sh(["git", "rev-parse", f"{res['ref']}"], root).stdout.strip()
        assert ref == res["commit"]
        assert lock_hashes(sh(["git", "show", f"{ref}:dvc.lock"], root).stdout) == res["outs"]
        assert yaml.safe_load(sh(["git", "show", f"{ref}:params.yaml"], root).stdout)["features"]["top_k"] == top_k
        md5 = res["outs"]["second:second.txt"]
        cached = root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        assert cached.read_text() == f"seed 1234\ntop_k {top_k}\n", "the job's output came through the DVC remote"
    assert out["points"][0]["result"]["outs"]["first:first.txt"] == out["points"][1]["result"]["outs"]["first:first.txt"]
    assert "top_k_squared" in out["table"] and "36" in out["table"]
    assert cli("resubmit").output.strip().endswith("no failed point to resubmit")


@pytest.mark.slow  # a DVC project with remotes (seconds on a quiet machine), jobs through submitit
def test_collect_refuses_an_experiment_that_is_not_what_its_job_pushed(project):
    root, git_remote, _ = project
    submit("-S", "features.top_k=3")
    code, out = collect_json()
    assert code == 0, out
    # someone force-pushes another commit under the experiment's ref on the git remote
    ref = out["points"][0]["result"]["ref"]
    sh(["git", "push", "-q", "-f", "origin", f"HEAD:{ref}"], root)
    res = cli("collect")
    assert res.exit_code == 14 and "its job pushed" in res.output


# --- settings: params.yaml's sweep section, flags over it, and what sbatch gets --------------------------


def test_flags_override_the_sweep_section_and_reach_sbatch(tmp_path):
    from projects import REPO

    from sasgate.sweep.cli import _settings

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sweep"]["slurm"].update(partition="cpu", mem_gb=4.0, setup=["source /opt/venv/bin/activate"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    s = _settings(str(tmp_path / "params.yaml"), executor="slurm", partition="gpu", time_min=30, gpus_per_node=1,
                  array_parallelism=3, git_remote=None, dvc_remote=None)
    assert (s.executor, s.slurm.partition, s.time_min, s.gpus_per_node, s.slurm.array_parallelism) == \
        ("slurm", "gpu", 30, 1, 3)
    assert s.slurm.mem_gb == 4.0 and s.git_remote == "origin", "what no flag names stays as params say"
    got = executors.executor(s, tmp_path / "jobs", "sweep-x").parameters
    assert {k: got[k] for k in ("partition", "time", "gpus_per_node", "array_parallelism", "mem", "job_name")} == \
        {"partition": "gpu", "time": 30, "gpus_per_node": 1, "array_parallelism": 3, "mem": "4096M",
         "job_name": "sweep-x"}
    assert got["setup"] == ["source /opt/venv/bin/activate"]
    raw["sweep"]["slurm"]["partitoin"] = "typo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    res = CliRunner().invoke(main, ["sweep", "submit", "-S", "features.top_k=2", "--params",
                                    str(tmp_path / "params.yaml")])
    assert res.exit_code == 2 and "sweep.slurm.partitoin" in res.output


def test_help_names_the_commands_and_exit_code_14():
    top = CliRunner().invoke(main, ["--help"]).output
    assert "14 sasgate sweep" in top
    for cmd in ("submit", "status", "collect", "resubmit"):
        out = CliRunner().invoke(main, ["sweep", cmd, "--help"]).output
        assert "14" in out and "Exit codes" in out, cmd
    assert "-S, --set-param KEY=V1,V2" in CliRunner().invoke(main, ["sweep", "submit", "--help"]).output
