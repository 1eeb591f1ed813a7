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
* `decision-equivalent`: some hashes differ, but no verdict flipped (`verdicts`: the
  decision, every gate status per gate and per tuple, every comparison outcome of the
  behaviour gate, the allowed and disallowed claim sets, the reopen conditions) and every
  gate figure (per-tuple observed value and ci95 bounds) is within the bundle's signed
  tolerance |new - old| <= atol + rtol*|old|;
* `not reproduced`: anything else, naming the flipped verdict (all of them are listed) or
  the figure out of tolerance, and the first differing artifact in stage order.

Figures within tolerance never excuse a flipped verdict: -0.099 becoming -0.101 against a
margin of 0.1 is a small number and the opposite result.

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
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Iterator, Literal

from sasgate.artifacts import iter_files, sha256_file
from sasgate.claims import GATES
from sasgate.errors import ArtifactError, SasgateError
from sasgate.gates import validate_gate

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
    flips: list[str] = field(default_factory=list)  # every verdict that differs, in `verdicts` order

    @property
    def first_difference(self) -> str | None:
        return self.differing[0] if self.differing else None

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "n_artifacts": self.n_artifacts, "differing": self.differing,
                "first_difference": self.first_difference, "reason": self.reason, "tolerances": self.tolerances,
                "worst_figure": self.worst_figure, "code": self.code, "flips": self.flips,
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
    for c in record.get("comparisons") or []:  # the behaviour gate's effect(SAS) - effect(DIM) and its CI
        label = f"comparison ({c.get('kind')}, {c.get('operator')})"
        yield f"{label} estimate", c.get("estimate")
        for i, bound in enumerate(c.get("ci") or []):
            yield f"{label} ci[{i}]", bound


def _record(path: Path, gate: str | None = None) -> dict[str, Any] | str:
    """A result file's JSON (a gate record validated as one), or why it cannot be read."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if gate is not None:
            validate_gate(raw, origin=f"gates/{gate}.json")
    except FileNotFoundError:
        return "absent"
    except (OSError, ValueError, RecursionError) as exc:
        return f"unreadable ({exc})"
    except SasgateError as exc:
        return f"malformed ({exc})"
    return raw if isinstance(raw, dict) else "not a JSON object"


def _gate_verdicts(rel: str, rec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {f"{rel} status": rec.get("status")}
    for t in rec.get("per_tuple") or []:
        tup = t.get("tuple") or {}
        out[f"{rel} {tup.get('model')} L{tup.get('layer')} {tup.get('site')} status"] = t.get("status")
    # the behaviour gate's three-valued outcomes (ARCHITECTURE.md, "The archive contract")
    if "outcome" in rec:
        out[f"{rel} outcome"] = rec["outcome"]
    for c in rec.get("comparisons") or []:
        out[f"{rel} comparison ({c.get('kind')}, {c.get('operator')}) outcome"] = c.get("outcome")
    # the stability gate's side of -margin and its split-half replication
    details = rec.get("details") or {}
    for key in ("pooled_on_side", "split_half_replicated"):
        if key in details:
            out[f"{rel} {key.replace('_', ' ')}"] = details[key]
    return out


def verdicts(root: Path) -> dict[str, Any]:
    """Every verdict a pipeline run states, each under a label naming it: what must not flip for
    decision-equivalent. The one place this list is kept (ARCHITECTURE.md, "The archive contract")."""
    out: dict[str, Any] = {}
    d = _record(root / "decision.json")
    if isinstance(d, str):  # absent or unreadable: under the label a readable one's state would have
        out["decision.json decision_state"] = d
    else:
        for k in DECISION_FIELDS:
            out[f"decision.json {k}"] = d.get(k)
        for g, summary in sorted((d.get("gates") or {}).items()):
            out[f"decision.json gate {g} status"] = summary.get("status") if isinstance(summary, dict) else summary
        claims = d.get("claims") or {}
        for kind in ("allowed", "disallowed"):
            out[f"decision.json {kind} claims"] = sorted(str(c.get("id")) for c in claims.get(kind) or [])
        out["decision.json reopen conditions"] = [[r.get("kind"), r.get("required_tuples")]
                                                  for r in d.get("reopen_conditions") or []]
    for gate in GATES:
        rel = f"gates/{gate}.json"
        rec = _record(root / rel, gate)
        if isinstance(rec, str):
            out[f"{rel} status"] = rec
        else:
            out.update(_gate_verdicts(rel, rec))
    return out


def _describe_flip(label: str, old: Any, new: Any) -> str:
    if isinstance(old, list) and isinstance(new, list) and label.endswith(" claims"):
        gained, lost = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        return f"{label}: the re-run gains {gained or 'none'} and loses {lost or 'none'}"
    return f"{label}: {_short(old)} in the bundle, {_short(new)} in the re-run"


def _short(v: Any, n: int = 120) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def verdict_flips(original: Path, project: Path) -> list[str]:
    """Every verdict of the bundle (at original) that the re-run (at project) states otherwise."""
    old, new = verdicts(original), verdicts(project)
    return [_describe_flip(label, old.get(label), new.get(label))
            for label in [*old, *(k for k in new if k not in old)] if old.get(label) != new.get(label)]


def _within_tolerance(original: Path, project: Path, tol: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the first gate figure outside the signed tolerance or None, the worst figure relative to its tolerance)."""
    rtol, atol = float(tol["rtol"]), float(tol["atol"])
    worst, worst_label = -1.0, None
    for old_path in sorted((original / "gates").glob("*.json")):
        rel = f"gates/{old_path.name}"
        new_path = project / rel
        if not new_path.is_file():
            return f"{rel}: not produced by the re-run", None
        old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
        new_figures = dict(_figures(new))
        for label, a in _figures(old):
            b = new_figures.get(label)
            if a is None or b is None:
                if a != b:
                    return f"{rel}: {label} is {a} in the bundle, {b} in the re-run", None
                continue
            ratio = abs(b - a) / (atol + rtol * abs(a)) if atol + rtol * abs(a) > 0 else (0.0 if a == b else 2.0)
            if ratio > worst:
                worst, worst_label = ratio, f"{rel} {label}: {a:.6g} -> {b:.6g} (|diff| {abs(b - a):.3g})"
            if ratio > 1:
                return f"{rel}: {label} {a:.6g} -> {b:.6g}, outside atol {atol} + rtol {rtol} * |old|", worst_label
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
    flips = verdict_flips(original, project)
    why, worst = _within_tolerance(original, project, tol)
    if flips:
        more = f" (and {len(flips) - 1} more verdicts)" if len(flips) > 1 else ""
        return Outcome("not reproduced", len(expected), differing, f"a verdict flipped: {flips[0]}{more}", tol,
                       worst, flips=flips)
    if why is None:
        return Outcome("decision-equivalent", len(expected), differing,
                       "no verdict flipped (decision, gate statuses, comparison outcomes, claims); gate figures "
                       "within tolerance", tol, worst)
    return Outcome("not reproduced", len(expected), differing, why, tol, worst)
