"""The bundle's `ro-crate-metadata.json`, written with the `rocrate` library.

An RO-Crate (https://w3id.org/ro/crate) following the Process Run Crate profile:
every bundled file is a File entity with its sha256 and size; each DVC stage is a
CreateAction whose `object` is its inputs and `result` its outputs (from dvc.lock),
with sasgate as the `instrument`. Large artifacts that are not in the bundle appear
as File entities with a local `#dvc:` id, their sha256 and DVC md5, and how to get
them. No wall-clock time: `datePublished` is the git commit's date.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable

from rocrate.rocrate import ROCrate

from sasgate.artifacts import canonical_json

from .dvcmeta import Stage, under

PROCESS_RUN_PROFILE = "https://w3id.org/ro/wfrun/process/0.5"
WFRUN_TERMS = "https://w3id.org/ro/terms/workflow-run"
SASGATE_ID = "#sasgate"
_FORMATS = {".json": "application/json", ".jsonl": "application/jsonl", ".yaml": "application/yaml",
            ".yml": "application/yaml", ".md": "text/markdown", ".py": "text/x-python", ".csv": "text/csv",
            ".safetensors": "application/octet-stream", ".toml": "application/toml", ".lock": "application/json",
            ".parquet": "application/vnd.apache.parquet", ".txt": "text/plain"}


@dataclass(frozen=True)
class FileFacts:
    name: str  # posix path relative to the project root (= inside the bundle)
    sha256: str
    size: int
    included: bool
    description: str | None = None
    md5: str | None = None  # DVC's per-file md5, for artifacts DVC caches


def not_included_id(name: str) -> str:
    return f"#dvc:{name}"


def _file_props(f: FileFacts) -> dict[str, Any]:
    props: dict[str, Any] = {"name": PurePosixPath(f.name).name, "contentSize": str(f.size), "sha256": f.sha256}
    if fmt := _FORMATS.get(PurePosixPath(f.name).suffix):
        props["encodingFormat"] = fmt
    if f.md5:
        props["identifier"] = f"md5:{f.md5}"
    if f.description:
        props["description"] = f.description
    return props


def _expand(paths: Iterable[str], ids: dict[str, str]) -> list[dict[str, str]]:
    """The entity refs of every file at or under each dvc.lock path."""
    refs: list[dict[str, str]] = []
    for p in paths:
        refs += [{"@id": ids[n]} for n in sorted(ids) if under(n, p)]
    return refs


def build(files: list[FileFacts], stages: list[Stage], *, title: str, description: str,
          date_published: str, sasgate_version: str, envelope_name: str) -> bytes:
    """ro-crate-metadata.json as canonical JSON bytes (deterministic for equal inputs)."""
    crate = ROCrate()
    crate.metadata.extra_contexts.append(WFRUN_TERMS)
    root = crate.root_dataset
    root["name"] = title
    root["description"] = description
    root["datePublished"] = date_published
    profile = crate.add_jsonld({"@id": PROCESS_RUN_PROFILE, "@type": "CreativeWork",
                                "name": "Process Run Crate", "version": "0.5"})
    root["conformsTo"] = [profile]
    app = crate.add_jsonld({"@id": SASGATE_ID, "@type": "SoftwareApplication", "name": "sasgate",
                            "version": sasgate_version,
                            "description": "gated SAE-steering experiment pipeline (DVC stages)"})

    ids: dict[str, str] = {}
    parts = []
    for f in sorted(files, key=lambda f: f.name):
        if f.included:
            entity = crate.add_file(dest_path=f.name, properties=_file_props(f))
        else:
            entity = crate.add_jsonld({"@id": not_included_id(f.name), "@type": "File", **_file_props(f)})
        ids[f.name] = entity.id
        parts.append(entity)
    envelope = crate.add_file(dest_path=envelope_name, properties={
        "name": PurePosixPath(envelope_name).name, "encodingFormat": "application/json",
        "description": "DSSE envelope (Ed25519) of an in-toto Statement v1 listing the sha256 of every other file"})
    root["hasPart"] = parts + [envelope]

    for stage in stages:
        props: dict[str, Any] = {"@type": "CreateAction", "name": f"DVC stage {stage.name}",
                                 "description": stage.cmd}
        action = crate.add_action(app, identifier=f"#stage-{stage.name}", properties=props)
        obj = _expand(stage.deps, ids) + ([{"@id": ids["params.yaml"]}] if stage.params and "params.yaml" in ids
                                          else [])
        if obj:
            action["object"] = obj
        result = _expand([o.path for o in stage.outs], ids)
        if result:
            action["result"] = result
        root.append_to("mentions", action)
    return canonical_json(crate.metadata.generate()).encode("utf-8")
