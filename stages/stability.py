"""`stability`: does the SAS-vs-DIM decision hold in every (seed, paraphrase set) cell? gates/stability.json.

The pooled decision (all seeds and paraphrase sets; the point-estimate rule of the behaviour
gate, at the same matched side-effect budgets) is recomputed in each cell with the pooled
matched coefficients held fixed. The gate passes when the share of cells agreeing with the
pooled decision is >= `stability.min_agreement`. The record lists every cell.

Plot (dvc.yaml): the stability grid, one bar per cell (min over induce/bypass of
effect(SAS) - effect(DIM)), with the margin -m marking where the decision flips.
"""

from __future__ import annotations

from typing import Any

from sasgate import behaviour
from sasgate.artifacts import atomic_write_json, write_manifest
from sasgate.gates import GATE_SCHEMA, compare, input_digests, write_gate
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

GATE = "stability"


def run(params: Params, paths: Paths) -> dict[str, Any]:
    margin = params.validity.margin
    threshold = params.stability.min_agreement
    rows, table, _, choices = behaviour.load_scored(params, paths)
    pooled = behaviour.point_differences(table, choices)
    pooled_holds = all(d >= -margin for d, _ in pooled.values())
    cells = behaviour.cell_decisions(rows, choices, margin)
    for c in cells:
        c["agrees"] = c["holds"] == pooled_holds
    share = sum(c["agrees"] for c in cells) / len(cells)
    status = "pass" if compare(share, ">=", threshold) else "fail"
    statement = f"SAS matches or beats DIM within margin {margin}"
    reason = (f"{sum(c['agrees'] for c in cells)}/{len(cells)} (seed, paraphrase set) cells agree with the pooled "
              f"decision ('{statement}' is {str(pooled_holds).lower()}): share {share:.3f} "
              f"{'>=' if status == 'pass' else '<'} {threshold}")
    write_gate(paths.gate(GATE), {
        "schema": GATE_SCHEMA, "gate": GATE, "status": status,
        "metric": "cell_agreement", "threshold": threshold, "comparison": ">=",
        "per_tuple": [{"tuple": behaviour.sas_tuple_ref(params, rows), "observed": share, "ci95": None, "status": status,
                       "extra": {"n_cells": len(cells)}}],
        "inputs": input_digests(paths.root, [paths.score_dir / behaviour.SCORES_FILE,
                                             paths.steer_dir / behaviour.SIDE_EFFECTS_FILE]),
        "params": params.section("steer", "validity", "stability"), "reason": reason,
        "details": {"statement": statement, "pooled_holds": pooled_holds,
                    "pooled_sas_minus_dim": {k: d for k, (d, _) in pooled.items()},
                    "coefficients": {k: {m: c.coefficient for m, c in v.items()} for k, v in choices.items()},
                    "cells": cells},
    })
    atomic_write_json(paths.plot("stability"), [
        {"cell": f"seed {c['seed']} / paraphrase set {c['paraphrase_set']}", "sas_minus_dim": c["observed"],
         "holds": int(c["holds"]), "agrees": int(c["agrees"])} for c in cells])
    metrics = {"status": status, "share_agreeing": share, "n_cells": len(cells), "pooled_holds": pooled_holds}
    atomic_write_json(paths.metrics("stability"), metrics)
    write_manifest(paths.manifest("stability"), "stability",
                   [paths.gate(GATE), paths.metrics("stability"), paths.plot("stability")], paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("stability", run)
