"""`decide`: the state machine over every gate record -> decision.json and CLAIMS.md.

Reads gates/{behaviour,stability,reconstruction,remediation}.json (a missing behaviour or
stability record counts as not passed), the required tuples from params, and writes
decision.json (sasgate.decision/1, canonical JSON: sorted keys, no timestamps) and CLAIMS.md
rendered from it, both at the project root, plus manifests/decide.json, so `sasgate status`
flags a hand-edited CLAIMS.md. The decision states whether preregistration/lock.json was made
before every gate record it judges (ARCHITECTURE.md, "Preregistration"); without a lock it
refuses (exit 8).
"""

from __future__ import annotations

from sasgate.artifacts import sha256_file, write_manifest
from sasgate.decision import Decision, decide, record_sha256, write_claims_md, write_decision
from sasgate.errors import ArtifactError, PreregistrationError
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.preregistration import PREREGISTER_HINT, read_in_time
from sasgate.stage_runner import stage_main
from sasgate.status import read_gates, required_tuples

STAGE = "decide"


def run(params: Params, paths: Paths) -> Decision:
    records = read_gates(paths)
    for name, rec in records.items():
        if rec is not None and sha256_file(paths.gate(name)) != record_sha256(rec):
            raise ArtifactError(f"{paths.rel(paths.gate(name))} is not in canonical form (edited by hand?): "
                                "re-run the stage that writes it")
    prereg = read_in_time(paths)
    if prereg is None:
        raise PreregistrationError(f"no preregistration at {paths.rel(paths.preregistration_lock)}: a decision "
                                   f"states whether its protocol preceded the results; run `{PREREGISTER_HINT}`")
    decision = decide(records, required_tuples(params), preregistration=prereg)
    write_decision(paths.decision, decision)
    write_claims_md(paths.claims_md, decision)
    write_manifest(paths.manifest(STAGE), STAGE, [paths.decision, paths.claims_md], paths.root)
    return decision


if __name__ == "__main__":
    stage_main(STAGE, run)
