"""`sasgate watch --evaluate`: would the reopened path pass the reconstruction gate?

The SAEs that cover a tuple and were not seen at lock time are fetched (safetensors only,
pinned to the commit the watcher read) and measured exactly as the remediation stage measures
candidates: the reconstruction gate's nMSE on the DVC-versioned eval activations
(artifacts/collect), against its threshold. Per tuple, candidates are tried in id order until
one passes. Only SAEs a params `sae` spec can load are evaluated (sae-lens disk format on the
Hub); the others are listed as not evaluable, with the reason.
"""

from __future__ import annotations

from typing import Any

from sasgate.params import Params
from sasgate.paths import Paths


def evaluate(report: dict[str, Any], params: Params, paths: Paths) -> dict[str, Any]:
    from sasgate.model_names import same_model
    from sasgate.stages.remediation import Candidate, Evaluator  # the gate's own measure, not a copy

    keys = {t.key for t in params.tuples}
    run = Evaluator(params, paths)
    per_tuple: dict[str, Any] = {}
    for t in report["coverage"]["per_tuple"]:
        fresh = set(report["reopen"]["fresh_covering"][t["id"]])
        rows = []
        for c in (c for c in t["covering"] if c["id"] in fresh):
            if t["key"] not in keys or not same_model(t["tuple"]["model"], params.model.name):
                rows.append({"id": c["id"], "status": "not evaluable", "reason": "the tuple is not one of this "
                             "project's params tuples (its eval activations are not here)"})
            elif c["spec"] is None:
                rows.append({"id": c["id"], "status": "not evaluable", "reason": "no params sae spec loads it "
                             "(not sae-lens disk format at a known commit)"})
            else:
                e = run(Candidate("watch", t["key"], c["id"], c["spec"]))
                rows.append({"id": c["id"], "spec": c["spec"], "status": e.status, "nmse": e.nmse,
                             "ci": list(e.ci) if e.ci else None, "error": e.error})
                if e.status == "pass":
                    break
        per_tuple[t["id"]] = rows
    passing = {k: any(r["status"] == "pass" for r in rows) for k, rows in per_tuple.items()}
    return {"would_pass": bool(passing) and all(passing.values()), "per_tuple": per_tuple,
            "summary": f"{sum(passing.values())}/{len(passing)} tuples with a passing new SAE, threshold "
                       f"{params.reconstruction.comparison} {params.reconstruction.threshold}"}
