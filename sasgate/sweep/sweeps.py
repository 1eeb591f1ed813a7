"""Submit a sweep, read its points' states, collect its experiments, resubmit its failed points.

Submitting refuses (SweepError, exit 14) what would make the jobs compute something other than the
commit the user sees: a dirty tree, a commit the git remote does not have, a baseline that is not
reproduced or whose outputs the DVC remote lacks, an invalid point. Collecting checks that each
experiment it pulls is the one its job reported (commit and every output's md5).
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SweepError
from . import executors, grid, record
from .executors import JobState
from .job import PointSpec, dvc, lock_hashes, run, run_point
from .record import Attempt, Point, Remote, SweepRecord
from .settings import SweepParams


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _git(root: Path, *args: str) -> str:
    return run(["git", *args], root, echo=False).strip()


def _quiet(args: list[str], root: Path, what: str) -> str:
    try:
        return run(args, root, echo=False)
    except SweepError as exc:
        raise SweepError(f"{what}: {exc}") from None


def git_remote(root: Path, name: str, commit: str) -> Remote:
    """The git remote `name`, checked to hold `commit` (jobs clone it from there)."""
    try:
        url = _git(root, "remote", "get-url", name)
    except SweepError:
        raise SweepError(f"no git remote {name!r} (sweep.git_remote): add one with `git remote add {name} URL`") from None
    _quiet(["git", "fetch", "--quiet", name], root, f"cannot fetch the git remote {name!r} ({url})")
    if not _git(root, "for-each-ref", "--contains", commit, f"refs/remotes/{name}"):
        raise SweepError(f"commit {commit[:12]} is not on the git remote {name!r}: `git push {name}` first")
    if "://" not in url and not Path(url).is_absolute():  # a relative path would not resolve in a job's clone
        url = str((root / url).resolve())
    return Remote(name=name, url=url)


def dvc_remote(root: Path, name: str | None) -> Remote:
    """The DVC remote the jobs pull from and push to (`name`, else the project's default), from the
    project's merged DVC config (relative folder URLs come back absolute)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            config = repo.config
            remotes = {n: str(r["url"]) for n, r in (config.get("remote") or {}).items()}
            default = config.get("core", {}).get("remote")
    except DvcException as exc:
        raise SweepError(f"{root}: cannot read the DVC config: {exc}") from None
    name = name or default
    if not name:
        raise SweepError("no default DVC remote: `dvc remote add -d NAME URL`, or set sweep.dvc_remote / --dvc-remote")
    if name not in remotes:
        raise SweepError(f"no DVC remote {name!r} (remotes: {sorted(remotes) or 'none'})")
    return Remote(name=name, url=remotes[name])


def check_baseline(root: Path, remote: Remote) -> None:
    """The commit's outputs are reproduced and on the DVC remote, so each job pulls them instead of
    recomputing stages its point does not reach."""
    stale = json.loads(_quiet(dvc("status", "--json"), root, "dvc status") or "{}")
    if stale:
        raise SweepError(f"the baseline is not reproduced ({', '.join(sorted(stale))} changed): "
                         "run `dvc repro`, commit dvc.lock, `dvc push`, then submit")
    missing = json.loads(_quiet(dvc("status", "--cloud", "--remote", remote.name, "--json"), root,
                                f"dvc status --cloud -r {remote.name}") or "{}")
    if missing:
        raise SweepError(f"the DVC remote {remote.name!r} lacks {len(missing)} of the baseline's outputs "
                         f"(e.g. {sorted(missing)[0]}): `dvc push -r {remote.name}` first")


def submit(root: Path, settings: SweepParams, overrides: list[str]) -> SweepRecord:
    root = root.resolve()
    points = grid.expand(overrides)
    for point in points:
        grid.check_point(root, point)
    try:
        commit = _git(root, "rev-parse", "HEAD")
    except SweepError:
        raise SweepError(f"{root} is not a git repository with a commit: a sweep runs a commit") from None
    dirty = _git(root, "status", "--porcelain")
    if dirty:
        raise SweepError("the working tree has uncommitted changes (jobs clone the commit, not the workspace):\n  "
                         + "\n  ".join(dirty.splitlines()[:10]))
    folder = (root / settings.folder).resolve()
    if folder.is_relative_to(root) and subprocess.run(
            ["git", "check-ignore", "-q", f"{folder.relative_to(root).as_posix()}/"], cwd=root).returncode != 0:
        raise SweepError(f"{settings.folder}/ is not git-ignored: add it to .gitignore (it holds job logs)")
    git = git_remote(root, settings.git_remote, commit)
    store = dvc_remote(root, settings.dvc_remote)
    check_baseline(root, store)

    sweep_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{commit[:7]}"
    if record.sweep_dir(folder, sweep_id).exists():
        raise SweepError(f"sweep {sweep_id} exists already: submit again in a second")
    named = [Point(index=i, name=f"{sweep_id}-p{i}", overrides=p, attempts=[]) for i, p in enumerate(points)]
    rec = SweepRecord(id=sweep_id, commit=commit, git_remote=git, dvc_remote=store, settings=settings, points=named)
    ids = _submit_points(root, rec, named)
    rec = rec.model_copy(update={"points": [p.model_copy(update={"attempts": [Attempt(job_id=j, submitted=_now())]})
                                            for p, j in zip(named, ids)]})
    record.write(folder, rec)
    return rec


def _jobs(root: Path, rec: SweepRecord) -> Path:
    return record.sweep_dir(root / rec.settings.folder, rec.id) / record.JOBS_DIR


def _submit_points(root: Path, rec: SweepRecord, points: list[Point]) -> list[str]:
    jobs = _jobs(root, rec)
    jobs.mkdir(parents=True, exist_ok=True)
    specs = [PointSpec(name=p.name, overrides=p.overrides, commit=rec.commit, git_url=rec.git_remote.url,
                       dvc_remote=rec.dvc_remote.name, dvc_url=rec.dvc_remote.url, scratch=rec.settings.scratch)
             for p in points]
    return executors.submit(rec.settings, jobs, f"sasgate-{rec.id}", run_point, specs)


@dataclass(frozen=True)
class PointStatus:
    point: Point
    job: JobState

    def as_dict(self) -> dict:
        return {"index": self.point.index, "name": self.point.name, "overrides": self.point.overrides,
                "attempts": len(self.point.attempts), "job_id": self.point.attempts[-1].job_id,
                "state": self.job.state, "error": self.job.error, "log": str(self.job.log),
                "err_log": str(self.job.err_log), "result": self.job.result}


def states(root: Path, rec: SweepRecord) -> list[PointStatus]:
    """Each point's latest attempt."""
    jobs = _jobs(root, rec)
    return [PointStatus(p, executors.state(rec.settings.executor, jobs, p.attempts[-1].job_id)) for p in rec.points]


def wait(root: Path, rec: SweepRecord, timeout_s: float | None, poll_s: float = 5.0) -> list[PointStatus]:
    """The states once no point is running (or the timeout passed)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        got = states(root, rec)
        if all(s.job.state != "running" for s in got) or (deadline is not None and time.monotonic() > deadline):
            return got
        time.sleep(poll_s)


def cached_outs(dvc_yaml_text: str) -> set[str]:
    """The "stage:path" outputs that DVC caches (the rest, `cache: false`, travel in git)."""
    import yaml

    cached = set()
    for name, stage in ((yaml.safe_load(dvc_yaml_text) or {}).get("stages") or {}).items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                if (opts or {}).get("cache", True):
                    cached.add(f"{name}:{path}")
    return cached


def _in_cache(cache: Path, md5: str) -> bool:
    obj = cache / "files" / "md5" / md5[:2] / md5[2:]
    if not obj.is_file():
        return False
    if not md5.endswith(".dir"):
        return True
    entries = json.loads(obj.read_text(encoding="utf-8"))
    return all((cache / "files" / "md5" / e["md5"][:2] / e["md5"][2:]).is_file() for e in entries)


def verify(root: Path, status: PointStatus, cache: Path) -> None:
    """The pulled experiment is the one its job pushed: same commit, every output's md5 as the job
    computed it, and every cached output in the local cache."""
    from .job import exp_ref

    res = status.job.result or {}
    name = status.point.name
    _ref, commit = exp_ref(root, name)
    if commit != res.get("commit"):
        raise SweepError(f"{name}: the pulled experiment is commit {commit[:12]}, its job pushed "
                         f"{str(res.get('commit'))[:12]}")
    got = lock_hashes(_git(root, "show", f"{commit}:dvc.lock"))
    if not got or got != res.get("outs"):
        diff = sorted(k for k in set(got) | set(res.get("outs") or {}) if got.get(k) != (res.get("outs") or {}).get(k))
        raise SweepError(f"{name}: dvc.lock of the pulled experiment differs from what its job computed: {diff}")
    cached = cached_outs(_git(root, "show", f"{commit}:dvc.yaml"))
    absent = sorted(k for k, md5 in got.items() if k in cached and not _in_cache(cache, md5))
    if absent:
        raise SweepError(f"{name}: outputs not in the local DVC cache after the pull: {absent}")


def collect(root: Path, rec: SweepRecord) -> tuple[list[PointStatus], str]:
    """Pull every succeeded point's experiment (git ref and outputs), verify it; the `dvc exp show`
    table of the sweep's commit."""
    got = states(root, rec)
    done = [s for s in got if s.job.state == "succeeded"]
    if done:
        _quiet(dvc("exp", "pull", "--force", "--remote", rec.dvc_remote.name, rec.git_remote.name,
                   *[s.point.name for s in done]), root, "dvc exp pull")
        cache = Path(_quiet(dvc("cache", "dir"), root, "dvc cache dir").strip())
        for s in done:
            verify(root, s, cache)
    table = _quiet(dvc("exp", "show", "--md", "--only-changed", "--rev", rec.commit), root, "dvc exp show") if done else ""
    return got, table


def resubmit(root: Path, rec: SweepRecord, indices: list[int]) -> tuple[SweepRecord, list[Point]]:
    """Submit again the failed points (all of them, or those named); never a succeeded or running one."""
    got = {s.point.index: s for s in states(root, rec)}
    unknown = sorted(set(indices) - set(got))
    if unknown:
        raise SweepError(f"sweep {rec.id} has no point {unknown} (points 0..{len(got) - 1})")
    chosen = indices or [i for i, s in got.items() if s.job.state == "failed"]
    busy = [f"{i} ({got[i].job.state})" for i in chosen if got[i].job.state != "failed"]
    if busy:
        raise SweepError(f"only failed points are resubmitted; not {', '.join(busy)}")
    if not chosen:
        return rec, []
    points = [got[i].point for i in sorted(chosen)]
    ids = _submit_points(root, rec, points)
    new = dict(zip((p.index for p in points), ids))
    rec = rec.model_copy(update={"points": [
        p.model_copy(update={"attempts": [*p.attempts, Attempt(job_id=new[p.index], submitted=_now())]})
        if p.index in new else p for p in rec.points]})
    record.write(root / rec.settings.folder, rec)
    return rec, [p for p in rec.points if p.index in new]
