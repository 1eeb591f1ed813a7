"""`params`: validate the whole params.yaml before any compute.

DVC only re-runs a stage for the params keys it declares, so a typo in a key no
stage reads would pass silently; this stage depends on the whole file. Its
output is a constant stamp, so a valid change does not cascade through it.
"""

from __future__ import annotations

from sasgate.artifacts import atomic_write_json, write_manifest
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

STAMP = {"schema": "sasgate.params_check/1", "valid": True}


def run(params: Params, paths: Paths) -> dict:
    out = paths.root / "artifacts" / "params_check.json"
    atomic_write_json(out, STAMP)
    write_manifest(paths.manifest("params"), "params", [out], paths.root)  # every stage has one (`sasgate status`)
    return STAMP


if __name__ == "__main__":
    stage_main("params", run)
