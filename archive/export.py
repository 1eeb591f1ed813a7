"""`sasgate archive export`: one signed, deterministic bundle of a finished pipeline run.

What goes in (all at their project-relative paths): every git-tracked file (the source
needed to re-run: sasgate/, stages/, dvc.yaml, params.yaml, presets in configs/, data/
with the locked eval set and its lock, the preregistration), untracked files that
dvc.lock lists as deps, dvc.lock, every `cache: false` DVC out (gate records, sha256
manifests, metrics, plots, decision.json, CLAIMS.md, report.html), the records among the DVC-cached
outs (the resolved eval set, generations, scores), and with --include-large the large
ones too (tensors: model and SAE weights, activations, vectors; or any file over 64 MiB);
without it those are listed by sha256 and DVC md5 with the `dvc pull` that fetches them.
Added: ro-crate-metadata.json,
_sasgate/bundle.json (git commit + dirty flag, large artifacts, tolerances),
_sasgate/environment.json, and _sasgate/statement.dsse.json, the signed statement.

Refused: a workspace that does not match dvc.lock (`dvc status`) or the sha256
manifests (WorkspaceMismatchError, exit 20, naming the files), any private key
among the files (KeyFileError, exit 21), negative or non-finite tolerances (ParamsError,
exit 2), and a preregistration timestamp that does not verify (TimestampError, exit 12).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from sasgate import __version__
from sasgate.artifacts import canonical_json, iter_files, read_json, read_manifest
from sasgate.errors import ArtifactError, KeyFileError, ParamsError, WorkspaceMismatchError
from sasgate.paths import Paths
from sasgate.preregistration import check_timestamp

from . import bundle, crate, dsse, dvcmeta, environment, keys
from .safe_extract import Limits, check_name

REQUIRED = ("params.yaml", "dvc.yaml", "dvc.lock", "decision.json", "CLAIMS.md", "report.html")
TENSOR_SUFFIXES = (".safetensors", ".npz", ".npy", ".pt", ".pth", ".bin", ".ckpt", ".gguf")
LARGE_BYTES = 64 << 20
ALWAYS_DIRS = ("preregistration",)  # bundled whole even if not committed yet
DEFAULT_RTOL = 0.05
DEFAULT_ATOL = 1e-3
TOLERANCE_RULE = ("|reproduced - original| <= atol + rtol * |original| for every gate record's per-tuple observed "
                  "value and ci95 bounds and every behaviour comparison's estimate and ci; every verdict (decision, "
                  "gate statuses, comparison outcomes, claims) equal")
_CHUNK = 1 << 20


def is_large(path: Path) -> bool:
    """A DVC-cached file that is only listed unless --include-large: tensors (weights, activations), or big.

    Other cached files are records (the resolved eval set, generations, scores) and always travel.
    """
    return path.suffix in TENSOR_SUFFIXES or path.stat().st_size > LARGE_BYTES


@dataclass(frozen=True)
class Hashed:
    sha256: str
    md5: str
    size: int
    private_key: bool


def hash_file(path: Path, progress: Callable[[int], Any] | None = None) -> Hashed:
    """sha256 + DVC's md5 + size in one read, and whether the bytes hold a private key block."""
    sha, md5, size, tail, found = hashlib.sha256(), hashlib.md5(), 0, b"", False
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
            found = found or keys.looks_like_private_key(tail + chunk)
            tail = chunk[-64:]
            if progress:
                progress(len(chunk))
    return Hashed(sha.hexdigest(), md5.hexdigest(), size, found)


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for git and dvc: this interpreter's bin first (dvc.yaml's `python`), no DVC analytics."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(args: list[str], root: Path, what: str) -> str:
    try:
        res = subprocess.run(args, cwd=root, env=tool_env(), capture_output=True, text=True)
    except FileNotFoundError:
        raise ArtifactError(f"{what}: `{args[0]}` is not installed") from None
    if res.returncode != 0:
        raise ArtifactError(f"{what} failed ({' '.join(args)}): {(res.stderr or res.stdout).strip()[-800:]}")
    return res.stdout


def check_dvc_status(root: Path) -> None:
    """Refuse unless `dvc status` finds every stage up to date (workspace == dvc.lock)."""
    changes = dvcmeta.dvc_status(root)
    if not changes:
        return
    problems = [f"{c.stage}: {c.describe()}" for c in changes]
    raise WorkspaceMismatchError("the workspace does not match dvc.lock (stale or modified artifacts):\n  "
                                 + "\n  ".join(problems) + "\nrun `dvc repro` (or `dvc checkout`) and export again")


@dataclass(frozen=True)
class GitState:
    commit: str | None
    commit_date: str | None
    dirty_paths: list[str]
    tracked: list[str]


def git_state(root: Path) -> GitState:
    def git(*args: str) -> str:
        return _run(["git", "-c", "core.quotepath=off", *args], root, "git")

    if git("rev-parse", "--show-toplevel").strip() != str(root):
        raise ArtifactError(f"{root} is not the top of a git repository; export bundles the git-tracked source")
    try:
        commit = git("rev-parse", "--verify", "HEAD").strip()
        date = git("log", "-1", "--format=%cI").strip()
    except ArtifactError:  # no commit yet
        commit = date = None
    status = git("status", "--porcelain=v1", "-z", "--untracked-files=no").split("\0")
    dirty = sorted({e[3:] for e in status if len(e) > 3})
    tracked = sorted(p for p in git("ls-files", "-z").split("\0") if p)
    return GitState(commit, date, dirty, tracked)


def dvc_remote(root: Path) -> dict[str, str] | None:
    """The default DVC remote from .dvc/config (never config.local: that holds credentials), URL without userinfo."""
    from configobj import ConfigObj, ConfigObjError

    cfg_path = root / ".dvc" / "config"
    if not cfg_path.is_file():
        return None
    try:
        cfg = ConfigObj(str(cfg_path), interpolation=False)
    except ConfigObjError as exc:
        raise ArtifactError(f".dvc/config: unreadable: {exc}") from None
    name = cfg.get("core", {}).get("remote")
    url = cfg.get(f'remote "{name}"', {}).get("url") if name else None
    if not name or not url:
        return None
    parts = urlsplit(url)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return {"name": name, "url": urlunsplit(parts)}


def predicate_for(decision: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The signed predicate: decision, claim limits and reopen condition, from decision.json and bundle.json.

    verify rebuilds it from the bundled files and requires equality, so the summary a
    recipient reads in the envelope cannot drift from the files it summarizes.
    """
    claims = decision.get("claims", {})
    return {
        "schema": bundle.PREDICATE_SCHEMA,
        "decision": {k: decision.get(k) for k in ("active_path", "phase_movement_authorized", "decision_state",
                                                  "stopped_by", "coverage")},
        "gates": {g: s.get("status") for g, s in sorted(decision.get("gates", {}).items())},
        "claims": {kind: [{"id": c["id"], "text": c["text"]} for c in claims.get(kind, [])]
                   for kind in ("allowed", "disallowed")},
        "reopen_conditions": decision.get("reopen_conditions", []),
        "preregistration": decision.get("preregistration"),  # preregistered_after_results and what preceded it
        "git": {k: info["git"][k] for k in ("commit", "dirty")},
        "signer": info["signer"],
        "sasgate_version": info["sasgate_version"],
    }


@dataclass(frozen=True)
class ExportResult:
    out: Path
    sha256: str
    n_files: int
    n_large_listed: int
    keyid: str
    decision_state: str


class _Collector:
    """Project files chosen for the bundle, each hashed once."""

    def __init__(self, root: Path, exclude: set[Path]) -> None:
        self.root, self.exclude = root, exclude
        self.files: dict[str, Path] = {}

    def add(self, rel: str) -> None:
        p = self.root / rel
        if p.is_dir():
            for f in iter_files(p):
                self.add(f.relative_to(self.root).as_posix())
        elif p.is_file() and p.resolve() not in self.exclude:
            if bundle.reserved(rel):
                raise ArtifactError(f"{rel}: this name is reserved for the bundle's own files; rename it")
            if problem := check_name(rel, Limits()):
                raise ArtifactError(f"cannot bundle {rel!r}: {problem} (a bundle holds project-relative paths only)")
            self.files[rel] = p


def export(root: str | os.PathLike, key_path: str | os.PathLike, out: str | os.PathLike, *,
           include_large: bool = False, passphrase: bytes | None = None, signer: str | None = None,
           rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> ExportResult:
    """Check the workspace, then write the signed bundle at out. See the module docstring."""
    root, out, key_file = Path(root).resolve(), Path(out).resolve(), Path(key_path).resolve()
    tolerances(rtol, atol)  # a usage error before any work
    key = keys.load_private(key_file, passphrase)
    stages = dvcmeta.read_pipeline(root)
    check_dvc_status(root)
    check_timestamp(Paths.at(root))  # a preregistration timestamp that does not verify is never signed (exit 12)
    git = git_state(root)
    outs = dvcmeta.all_outs(stages)

    chosen = _Collector(root, exclude={out})
    for rel in git.tracked:
        if dvcmeta.out_of(rel, [o for o in outs if o.cached]) is None:
            chosen.add(rel)
    deps = _Collector(root, exclude={out})
    for d in {d for s in stages for d in s.deps if dvcmeta.out_of(d, outs) is None}:
        deps.add(d)
    untracked_deps = sorted(set(deps.files) - set(git.tracked))
    for rel in [*untracked_deps, *REQUIRED, *ALWAYS_DIRS, *(o.path for o in outs if not o.cached)]:
        chosen.add(rel)
    for rel in REQUIRED:
        if rel not in chosen.files:
            raise ArtifactError(f"{rel} is missing: run the whole pipeline (`dvc repro`) before exporting")
    cached = _Collector(root, exclude={out})
    for o in outs:
        if o.cached:
            cached.add(o.path)
    large = _Collector(root, exclude={out})
    for rel, p in cached.files.items():
        (large if is_large(p) else chosen).files[rel] = p
    if key_file in {p.resolve() for p in [*chosen.files.values(), *large.files.values()]}:
        raise KeyFileError(f"the signing key {key_path} is one of the files to bundle; keep private keys outside "
                           "the project")

    everything = {**chosen.files, **large.files}
    total = sum(p.stat().st_size for p in everything.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing", disable=None, leave=False) as bar:
        hashed = {rel: hash_file(p, bar.update) for rel, p in sorted(everything.items())}
    scan = hashed if include_large else {r: h for r, h in hashed.items() if r in chosen.files}
    if leaked := sorted(r for r, h in scan.items() if h.private_key):
        raise KeyFileError(f"refusing to bundle what looks like a private key: {', '.join(leaked)}")
    _check_manifests(root, chosen.files, hashed)

    decision = read_json(root / "decision.json")
    info = _bundle_info(root, stages, git, large.files, hashed, include_large, key, signer, rtol, atol,
                        untracked_deps)
    included = dict(chosen.files, **(large.files if include_large else {}))
    entries = {rel: bundle.Entry(rel, hashed[rel].sha256, source=p, compress=rel not in large.files)
               for rel, p in included.items()}
    generated = {bundle.BUNDLE_INFO: canonical_json(info).encode(),
                 bundle.ENVIRONMENT: canonical_json(environment.describe()).encode()}
    facts = [crate.FileFacts(rel, hashed[rel].sha256, hashed[rel].size, True,
                             md5=hashed[rel].md5 if rel in cached.files else None) for rel in included]
    facts += [crate.FileFacts(n, hashlib.sha256(d).hexdigest(), len(d), True) for n, d in generated.items()]
    facts += [crate.FileFacts(a["path"], a["sha256"], a["size"], False, _fetch_hint(a, info["dvc_remote"]), a["md5"])
              for a in info["large_artifacts"] if not a["included"]]
    generated[bundle.CRATE] = crate.build(
        facts, stages, title=f"sasgate negative-result bundle: {decision.get('decision_state')} "
                             f"({decision.get('active_path')})",
        description="A gated SAE-steering experiment: its params, code, locked data, gate records, decision and "
                    "claim limits, signed (see _sasgate/statement.dsse.json).",
        date_published=git.commit_date or "1970-01-01T00:00:00+00:00", sasgate_version=__version__,
        envelope_name=bundle.ENVELOPE)
    for name, data in generated.items():
        entries[name] = bundle.Entry(name, hashlib.sha256(data).hexdigest(), data=data)
    statement = dsse.make_statement({n: e.sha256 for n, e in entries.items()}, predicate_for(decision, info))
    envelope = dsse.sign(statement, key)
    entries[bundle.ENVELOPE] = bundle.Entry(bundle.ENVELOPE, hashlib.sha256(envelope).hexdigest(), data=envelope)
    bundle.write_bundle(out, list(entries.values()))
    return ExportResult(out, hash_file(out).sha256, len(entries), sum(not a["included"] for a in info["large_artifacts"]),
                        keys.fingerprint(key.public_key()), str(decision.get("decision_state")))


def _check_manifests(root: Path, files: dict[str, Path], hashed: dict[str, Hashed]) -> None:
    """Every sasgate manifest among the bundled files must match the workspace's sha256 and sizes."""
    bad: list[str] = []
    for rel in sorted(r for r in files if r.startswith("manifests/") and r.endswith(".json")):
        for path, entry in sorted(read_manifest(root / rel).files.items()):
            h = hashed.get(path)
            if h is None and (root / path).is_file():
                h = hash_file(root / path)
            if h is None or h.sha256 != entry.sha256 or h.size != entry.size:
                bad.append(f"{path} ({rel}: {'missing' if h is None else 'sha256/size differ'})")
    if bad:
        raise WorkspaceMismatchError("artifacts do not match their sha256 manifests:\n  " + "\n  ".join(bad)
                                     + "\nrun `dvc repro` and export again")


def tolerances(rtol: float, atol: float) -> bundle.Tolerances:
    """The signed tolerances for decision-equivalent re-runs; negative or non-finite ones are a usage error."""
    from pydantic import ValidationError

    from sasgate.validation import describe_validation

    try:
        return bundle.Tolerances(rtol=rtol, atol=atol, rule=TOLERANCE_RULE)
    except ValidationError as exc:
        raise ParamsError(f"tolerances --rtol/--atol: {describe_validation(exc)}") from None


def _fetch_hint(artifact: dict[str, Any], remote: dict[str, str] | None) -> str:
    where = f"from DVC remote {remote['name']} ({remote['url']})" if remote else \
        "(no DVC remote configured: or re-create it with `dvc repro`)"
    return f"not in this bundle: `dvc pull {artifact['out']}` {where}"


def _bundle_info(root: Path, stages: list[dvcmeta.Stage], git: GitState, large: dict[str, Path],
                 hashed: dict[str, Hashed], include_large: bool, key: Any, signer: str | None,
                 rtol: float, atol: float, untracked_deps: list[str]) -> dict[str, Any]:
    outs = dvcmeta.all_outs(stages)
    large_rows = []
    for rel in sorted(large):
        o = dvcmeta.out_of(rel, outs)
        assert o is not None
        large_rows.append({"path": rel, "sha256": hashed[rel].sha256, "size": hashed[rel].size,
                           "md5": hashed[rel].md5, "out": o.path, "out_md5": o.md5, "stage": o.stage,
                           "included": include_large})
    return {
        "schema": bundle.BUNDLE_SCHEMA,
        "sasgate_version": __version__,
        "git": {"commit": git.commit, "commit_date": git.commit_date, "dirty": bool(git.dirty_paths),
                "dirty_paths": git.dirty_paths, "untracked_included": untracked_deps},
        "stages": [s.name for s in stages],
        "dvc_remote": dvc_remote(root),
        "include_large": include_large,
        "large_artifacts": large_rows,
        "tolerances": tolerances(rtol, atol).model_dump(),
        "signer": {"keyid": keys.fingerprint(key.public_key()), "name": signer},
    }
