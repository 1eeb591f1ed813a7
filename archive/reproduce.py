"""`sasgate archive verify --reproduce`: re-run a verified bundle's pipeline and say how close it came.

The bundle is extracted (while it is verified) into WORKDIR/bundle; its project files,
minus every DVC out and dvc.lock, are copied to WORKDIR/project, which becomes a fresh
git repository; `dvc repro` runs there with the python already installed (nothing is
installed) and the bundle's own sasgate source: its packages are laid out under
WORKDIR/pythonpath as pyproject's package-dir map installs them, and that folder leads
PYTHONPATH, so `python -m sasgate.stages.X` runs the code that produced the bundle (checked
before the run), not whatever sasgate version is installed. Then every artifact is compared
with the bundle's sha256:

* `bit-exact`: every artifact the bundle holds or lists has the same sha256;
* `decision-equivalent`: some hashes differ, but every gate status (per gate and per
  tuple) and the decision match, and every gate figure (per-tuple observed value and
  ci95 bounds) is within the bundle's signed tolerance |new - old| <= atol + rtol*|old|;
* `not reproduced`: anything else, naming the first differing artifact in stage order.

The bundle's dvc.yaml commands and source run on this machine: only re-run a bundle that
verified with the key of a signer you trust (the CLI verifies first).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, Iterator, Literal

from sasgate.artifacts import iter_files, sha256_file
from sasgate.errors import ArtifactError

from . import bundle, dvcmeta
from .export import tool_env
from .verify import Verified, artifact_digests

Verdict = Literal["bit-exact", "decision-equivalent", "not reproduced"]
GIT_ENV = {"GIT_AUTHOR_NAME": "sasgate reproduce", "GIT_AUTHOR_EMAIL": "reproduce@sasgate.invalid",
           "GIT_COMMITTER_NAME": "sasgate reproduce", "GIT_COMMITTER_EMAIL": "reproduce@sasgate.invalid"}
DECISION_FIELDS = ("active_path", "phase_movement_authorized", "decision_state", "state_row", "stopped_by",
                   "coverage", "required_tuples")


@dataclass
class Outcome:
    verdict: Verdict
    n_artifacts: int
    differing: list[str]
    reason: str
    tolerances: dict[str, Any]
    worst_figure: str | None = None
    code: str = ""
    workdir: Path | None = None

    @property
    def first_difference(self) -> str | None:
        return self.differing[0] if self.differing else None

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "n_artifacts": self.n_artifacts, "differing": self.differing,
                "first_difference": self.first_difference, "reason": self.reason, "tolerances": self.tolerances,
                "worst_figure": self.worst_figure, "code": self.code,
                "workdir": str(self.workdir) if self.workdir else None}


def _sh(args: list[str], cwd: Path, pythonpath: Path | None = None, log: Path | None = None
        ) -> subprocess.CompletedProcess:
    extra = dict(GIT_ENV)
    if pythonpath is not None:  # first on sys.path; PYTHONSAFEPATH: not the cwd, whose sasgate/ lacks stages/
        extra["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])])
        extra["PYTHONSAFEPATH"] = "1"
    res = subprocess.run(args, cwd=cwd, env=tool_env(**extra), capture_output=True, text=True)
    if log is not None:
        log.write_text(res.stdout + res.stderr, encoding="utf-8")
    return res


def prepare_project(original: Path, project: Path) -> list[dvcmeta.Stage]:
    """Copy the bundle's project files (no DVC outs, no dvc.lock, no bundle metadata) and git-commit them."""
    stages = dvcmeta.read_pipeline(original)
    outs = dvcmeta.all_outs(stages)
    for f in sorted(p for p in original.rglob("*") if p.is_file()):  # hidden files too (.dvc/config)
        rel = f.relative_to(original).as_posix()
        if bundle.reserved(rel) or rel == "dvc.lock" or dvcmeta.out_of(rel, outs) is not None:
            continue
        target = project / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "sasgate bundle"]):
        res = _sh(args, project)
        if res.returncode != 0:
            raise ArtifactError(f"{' '.join(args)} failed in {project}: {res.stderr.strip()[-400:]}")
    return stages


def package_dirs(original: Path) -> dict[str, str]:
    """The bundle's {package: folder} map from its pyproject.toml ({} when it carries no sasgate source)."""
    try:
        cfg = tomllib.loads((original / "pyproject.toml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ArtifactError(f"pyproject.toml: unreadable ({exc})") from None
    dirs = cfg.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    if "sasgate" not in dirs:
        return {}
    for package, folder in dirs.items():
        if not (original / folder).is_dir() or ".." in Path(folder).parts or Path(folder).is_absolute():
            raise ArtifactError(f"pyproject.toml: package {package} maps to {folder!r}, not a folder of the bundle")
    return dict(sorted(dirs.items()))  # "sasgate" before "sasgate.stages": parents first


def source_overlay(original: Path, dest: Path, project: Path) -> str:
    """Lay the bundle's packages out under dest as installed; say which code the re-run will import.

    Checked in a child python started as the stages are (in project, dest on PYTHONPATH): every
    package must resolve inside dest, or the re-run would silently use installed code.
    """
    dirs = package_dirs(original)
    if not dirs:
        import sasgate

        return f"the installed sasgate {sasgate.__version__} (the bundle carries no sasgate source)"
    for package, folder in dirs.items():
        shutil.copytree(original / folder, dest.joinpath(*package.split(".")), dirs_exist_ok=True)
    probe = "import importlib.util as u, sys; print('\\n'.join(u.find_spec(p).submodule_search_locations[0] " \
            "for p in sys.argv[1:]))"
    res = _sh([sys.executable, "-c", probe, *dirs], project, pythonpath=dest)
    found = res.stdout.split("\n")[: len(dirs)] if res.returncode == 0 else []
    outside = [p for p, where in zip_longest(dirs, found)
               if not where or not Path(where).resolve().is_relative_to(dest.resolve())]
    if outside:
        raise ArtifactError(f"cannot make the re-run import the bundle's source for {', '.join(outside)} "
                            f"({res.stderr.strip()[-300:] or 'resolved elsewhere'})")
    return f"the bundle's source ({', '.join(dirs)}) with the installed dependencies"


def _artifacts(stages: list[dvcmeta.Stage], digests: dict[str, str]) -> list[str]:
    """Every artifact path the bundle holds or lists, in stage order, then path order."""
    order: dict[str, None] = {}
    for out in dvcmeta.all_outs(stages):
        order.update((p, None) for p in sorted(digests) if dvcmeta.under(p, out.path))
    return list(order)


def _reproduced(project: Path, stages: list[dvcmeta.Stage]) -> dict[str, str]:
    out: dict[str, str] = {}
    for o in dvcmeta.all_outs(stages):
        p = project / o.path
        if p.exists():
            for f in iter_files(p):
                out[f.relative_to(project).as_posix()] = sha256_file(f)
    return out


def _figures(record: dict[str, Any]) -> Iterator[tuple[str, float | None]]:
    for t in record.get("per_tuple", []):
        tup = t.get("tuple", {})
        label = f"L{tup.get('layer')}.{tup.get('site')}"
        yield f"{label} observed", t.get("observed")
        for i, bound in enumerate(t.get("ci95") or []):
            yield f"{label} ci95[{i}]", bound


def _equivalence(original: Path, project: Path, tol: dict[str, Any]) -> tuple[str | None, str | None]:
    """(why not decision-equivalent or None, the worst figure relative to its tolerance)."""
    rtol, atol = float(tol["rtol"]), float(tol["atol"])
    worst, worst_label = -1.0, None
    for old_path in sorted((original / "gates").glob("*.json")):
        rel = f"gates/{old_path.name}"
        new_path = project / rel
        if not new_path.is_file():
            return f"{rel}: not produced by the re-run", None
        old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
        if old.get("status") != new.get("status"):
            return f"{rel}: gate status {old.get('status')} became {new.get('status')}", None
        if [t.get("status") for t in old.get("per_tuple", [])] != [t.get("status") for t in new.get("per_tuple", [])]:
            return f"{rel}: per-tuple statuses differ", None
        new_figures = dict(_figures(new))
        for label, a in _figures(old):
            b = new_figures.get(label)
            if a is None or b is None:
                if a != b:
                    return f"{rel}: {label} is {a} in the bundle, {b} in the re-run", None
                continue
            ratio = abs(b - a) / (atol + rtol * abs(a))
            if ratio > worst:
                worst, worst_label = ratio, f"{rel} {label}: {a:.6g} -> {b:.6g} (|diff| {abs(b - a):.3g})"
            if ratio > 1:
                return f"{rel}: {label} {a:.6g} -> {b:.6g}, outside atol {atol} + rtol {rtol} * |old|", worst_label
    try:
        old_d = json.loads((original / "decision.json").read_text())
        new_d = json.loads((project / "decision.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"decision.json: not produced by the re-run ({exc})", worst_label
    for k in DECISION_FIELDS:
        if old_d.get(k) != new_d.get(k):
            return f"decision.json: {k} differs ({old_d.get(k)!r} -> {new_d.get(k)!r})", worst_label
    for kind in ("allowed", "disallowed"):
        ids = [[c["id"] for c in d.get("claims", {}).get(kind, [])] for d in (old_d, new_d)]
        if ids[0] != ids[1]:
            return f"decision.json: {kind} claims differ ({ids[0]} -> {ids[1]})", worst_label
    if [(r.get("kind"), r.get("required_tuples")) for r in old_d.get("reopen_conditions", [])] != \
            [(r.get("kind"), r.get("required_tuples")) for r in new_d.get("reopen_conditions", [])]:
        return "decision.json: reopen conditions differ", worst_label
    return None, worst_label


def reproduce(verified: Verified, workdir: Path) -> Outcome:
    """Re-run the pipeline of a verified bundle extracted at workdir/bundle; compare (module docstring)."""
    workdir = workdir.resolve()
    original, project, pythonpath = workdir / "bundle", workdir / "project", workdir / "pythonpath"
    project.mkdir()
    pythonpath.mkdir()
    stages = prepare_project(original, project)
    code = source_overlay(original, pythonpath, project)
    res = _sh([sys.executable, "-m", "dvc", "repro"], project, pythonpath=pythonpath, log=workdir / "dvc-repro.log")
    failure = None if res.returncode == 0 else \
        "dvc repro failed: " + " / ".join((res.stderr or res.stdout).strip().splitlines()[-5:])
    outcome = compare(verified, original, project, stages, failure)
    outcome.code = code
    outcome.workdir = workdir
    return outcome


def compare(verified: Verified, original: Path, project: Path, stages: list[dvcmeta.Stage],
            failure: str | None = None) -> Outcome:
    """The verdict for a re-run in project against the bundle extracted at original."""
    tol = verified.info["tolerances"]
    digests = artifact_digests(verified.contents, verified.info)
    expected = {p: digests[p] for p in _artifacts(stages, digests)}
    got = _reproduced(project, stages)
    differing = [p for p in expected if got.get(p) != expected[p]]
    differing += sorted(set(got) - set(expected))
    if failure is not None:
        return Outcome("not reproduced", len(expected), differing, failure, tol)
    if not differing:
        return Outcome("bit-exact", len(expected), [], "every artifact has the bundle's sha256", tol)
    why, worst = _equivalence(original, project, tol)
    if why is None:
        return Outcome("decision-equivalent", len(expected), differing,
                       "every gate status and the decision match; gate figures within tolerance", tol, worst)
    return Outcome("not reproduced", len(expected), differing, why, tol, worst)
