"""What dvc.yaml and dvc.lock say about the pipeline: stages in order, deps, outs, cache flags, md5s.

Read as plain YAML (DVC's documented file formats) so export, the RO-Crate provenance,
`--reproduce` and `sasgate status` share one view: which outs are DVC-cached ("large": fetched
with `dvc pull`) and which are `cache: false` ("small": kept in git and always bundled). What
DVC itself says about the workspace (`dvc status`) is read here too, once, for export and status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sasgate.artifacts import read_yaml
from sasgate.errors import ArtifactError

_OUT_KINDS = ("outs", "metrics", "plots")


@dataclass(frozen=True)
class Out:
    path: str
    cached: bool
    md5: str | None  # from dvc.lock; a directory's ends in ".dir"
    stage: str


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    dep_md5: dict[str, str | None]
    outs: tuple[Out, ...]
    params: dict[str, Any]


def _load(path: Path) -> dict[str, Any]:
    hint = "run `dvc repro` first" if path.name == "dvc.lock" else "not the root of a DVC project"
    raw = read_yaml(path, ArtifactError, f"missing {path.name}: {hint}")
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict):
        raise ArtifactError(f"{path.name}: no `stages` mapping")
    return raw


def _cache_flags(spec: dict[str, Any], stage: str) -> dict[str, bool]:
    flags: dict[str, bool] = {}
    for kind in _OUT_KINDS:
        for item in spec.get(kind) or []:
            if isinstance(item, str):
                flags[item] = True
            elif isinstance(item, dict) and len(item) == 1:
                (path, opts), = item.items()
                flags[path] = bool((opts or {}).get("cache", True))
            else:
                raise ArtifactError(f"dvc.yaml: stage {stage}: unreadable {kind} entry {item!r}")
    return flags


def read_pipeline(root: Path) -> list[Stage]:
    """The stages of dvc.yaml, in file order, with their dvc.lock entries. Every stage must be locked."""
    spec = _load(root / "dvc.yaml")
    lock = _load(root / "dvc.lock")["stages"]
    stages: list[Stage] = []
    for name, st in spec["stages"].items():
        if not isinstance(st, dict) or "foreach" in st or "matrix" in st:
            raise ArtifactError(f"dvc.yaml: stage {name}: foreach/matrix stages are not supported by export")
        if name not in lock:
            raise ArtifactError(f"stage {name} is not in dvc.lock: run `dvc repro` first")
        locked = lock[name]
        flags = _cache_flags(st, name)
        outs = []
        for o in locked.get("outs") or []:
            if o["path"] not in flags:
                raise ArtifactError(f"dvc.lock: stage {name}: out {o['path']} is not declared in dvc.yaml")
            outs.append(Out(o["path"], flags[o["path"]], o.get("md5"), name))
        cmd = st.get("cmd", "")
        stages.append(Stage(
            name=name, cmd=" && ".join(cmd) if isinstance(cmd, list) else str(cmd),
            deps=tuple(d["path"] for d in locked.get("deps") or []),
            dep_md5={d["path"]: d.get("md5") for d in locked.get("deps") or []},
            outs=tuple(outs), params=locked.get("params") or {},
        ))
    return stages


def all_outs(stages: list[Stage]) -> list[Out]:
    return [o for s in stages for o in s.outs]


def under(path: str, prefix: str) -> bool:
    """Whether the posix path is prefix itself or inside the folder prefix."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def out_of(path: str, outs: list[Out]) -> Out | None:
    """The DVC out a file belongs to, if any."""
    return next((o for o in outs if under(path, o.path)), None)


def declared_outs(root: Path) -> dict[str, tuple[str, ...]]:
    """{stage: its outs, metrics and plots} as dvc.yaml declares them, in file order (dvc.lock not needed)."""
    spec = _load(root / "dvc.yaml")
    declared: dict[str, tuple[str, ...]] = {}
    for name, st in spec["stages"].items():
        if not isinstance(st, dict) or "foreach" in st or "matrix" in st:
            raise ArtifactError(f"dvc.yaml: stage {name}: foreach/matrix stages are not supported")
        declared[name] = tuple(_cache_flags(st, name))
    return declared


@dataclass(frozen=True)
class Change:
    """One line of `dvc status`: a stage's changed out or dep (path and what changed), or a stage-level note."""

    stage: str
    kind: str  # "changed outs", "changed deps", "changed command", "always changed", ...
    path: str | None = None
    what: str | None = None  # "deleted", "modified", "not in cache", "reconstruction.threshold modified", ...

    def describe(self) -> str:
        return self.kind if self.path is None else f"{self.kind}: {self.path} ({self.what})"


def _what(change: object) -> str:
    """`modified`, or for params `reconstruction.threshold modified, ...`."""
    if isinstance(change, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(change.items()))
    return str(change)


def dvc_status(root: Path) -> list[Change]:
    """What `dvc status --json` reports for the project at root (empty: every stage matches dvc.lock)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    try:
        res = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=env,
                             capture_output=True, text=True)
    except OSError as exc:
        raise ArtifactError(f"dvc status could not run: {exc}") from None
    if res.returncode != 0:
        raise ArtifactError(f"dvc status failed: {(res.stderr or res.stdout).strip()[-800:]}")
    try:
        raw = json.loads(res.stdout or "{}")
    except json.JSONDecodeError:
        raise ArtifactError(f"dvc status printed no JSON: {res.stdout.strip()[-300:]}") from None
    changes: list[Change] = []
    for stage, entries in sorted(raw.items()):
        for entry in entries:
            if isinstance(entry, dict):
                for kind, files in sorted(entry.items()):
                    if isinstance(files, dict):
                        changes += [Change(stage, kind, p, _what(w)) for p, w in sorted(files.items())]
                    else:
                        changes.append(Change(stage, f"{kind}: {files}"))
            else:
                changes.append(Change(stage, str(entry)))
    return changes
