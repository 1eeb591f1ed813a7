"""`stability`: does the SAS-vs-DIM result hold across seeds, wordings and prompts? gates/stability.json.

ARCHITECTURE.md, "The stability gate". Two tests, both at the strengths chosen on the selection split:

* **cells**: the comparisons recomputed in every (seed, paraphrase set) cell. A cell holds the *same*
  eval source prompts as the pooled result, sampled with another seed and worded in another paraphrase
  set: it tests seeds and wordings, not other prompts. A cell agrees when its point estimate of
  effect(SAS) - effect(DIM) lies on the pooled estimate's side of -margin for every comparison.
* **split half**: the eval source prompts of each class split (seeded) into two disjoint halves, each
  judged on its own (point estimate, cluster-bootstrap CI, three-valued outcome): a replication on other
  prompts. A half agrees under the same side rule.

The gate passes when the share of agreeing cells >= `stability.min_agreement` and both halves agree.
The record lists every cell, both halves, and how each paraphrase family was made (and whether it was
held out from training and selection), which is all a robustness claim may name.
"""

from __future__ import annotations

import random
from typing import Any

from sasgate import behaviour
from sasgate.artifacts import atomic_write_json, write_manifest
from sasgate.evalset import paraphrase_families
from sasgate.gates import GATE_SCHEMA, compare, input_digests, write_gate
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

GATE = "stability"
CELLS_ARE = ("the same eval source prompts as the pooled result, under one sampling seed and one paraphrase set "
             "each: other seeds and wordings, not other prompts")
HALVES_ARE = "two disjoint halves of the eval source prompts of each class (seeded split): other prompts"


def on_side(estimates: dict[str, float], margin: float) -> bool:
    """True when every comparison's point estimate is >= -margin (the side the pooled result is judged on)."""
    return all(d >= -margin for d in estimates.values())


def halves(rows: list[behaviour.ScoreRow], seed: int) -> list[set[str]]:
    """Each class's source prompts shuffled (seeded) and cut in two; half i holds the i-th part of each class."""
    out: list[set[str]] = [set(), set()]
    for label in behaviour.LABELS:
        sources = sorted({r.source_id for r in rows if r.label == label})
        random.Random(f"{seed}:split-half:{label}").shuffle(sources)
        cut = len(sources) // 2
        out[0].update(sources[:cut])
        out[1].update(sources[cut:])
    return out


def run(params: Params, paths: Paths) -> dict[str, Any]:
    vp, sp = params.validity, params.stability
    margin = vp.margin
    rows, table, strengths = behaviour.load_eval(params, paths)
    pooled = behaviour.point_estimates(table, strengths)
    pooled_side = on_side(pooled, margin)

    cells = []
    for seed, pset in sorted({(r.seed, r.paraphrase_set) for r in rows}):
        sub = behaviour.restrict(table, lambda u, s=seed, p=pset: u[2] == s and u[1] == p)
        est = behaviour.point_estimates(sub, strengths)
        cells.append({"seed": seed, "paraphrase_set": pset, "sas_minus_dim": est, "observed": min(est.values()),
                      "holds": on_side(est, margin), "agrees": on_side(est, margin) == pooled_side})
    share = sum(c["agrees"] for c in cells) / len(cells)

    split = []
    for i, half in enumerate(halves(rows, sp.split_seed)):
        sub = behaviour.restrict(table, lambda u, h=half: u[0] in h)
        comps = [behaviour.compare(sub, strengths, kind, op, margin, vp.bootstrap_samples, vp.bootstrap_seed + 1 + i,
                                   vp.ci_level) for kind, op in behaviour.COMPARED]
        est = {c["kind"]: c["estimate"] for c in comps}
        split.append({"half": i, "n_sources": len(half), "sas_minus_dim": est, "agrees": on_side(est, margin) == pooled_side,
                      "comparisons": [{k: c[k] for k in ("kind", "operator", "estimate", "ci", "outcome", "n_units")}
                                      for c in comps]})
    replicated = all(h["agrees"] for h in split)
    status = "pass" if compare(share, ">=", sp.min_agreement) and replicated else "fail"
    side = "on or above" if pooled_side else "below"
    reason = (f"{sum(c['agrees'] for c in cells)}/{len(cells)} (seed, paraphrase set) cells put effect(SAS) - "
              f"effect(DIM) {side} -{margin} as the pooled estimate does (share {share:.3f} "
              f"{'>=' if share >= sp.min_agreement else '<'} {sp.min_agreement}); split-half replication on "
              f"disjoint source prompts: {sum(h['agrees'] for h in split)}/2 halves agree")
    write_gate(paths.gate(GATE), {
        "schema": GATE_SCHEMA, "gate": GATE, "status": status,
        "metric": "cell_agreement", "threshold": sp.min_agreement, "comparison": ">=",
        "per_tuple": [{"tuple": behaviour.sas_tuple_ref(params, strengths), "observed": share, "ci95": None,
                       "status": status, "extra": {"n_cells": len(cells), "split_half_replicated": replicated}}],
        "inputs": input_digests(paths.root, [paths.score_dir / behaviour.SCORES_FILE,
                                             paths.calibrate_dir / behaviour.STRENGTHS_FILE]),
        "params": params.section("steer", "validity", "stability"), "reason": reason,
        "details": {"margin": margin, "pooled_sas_minus_dim": pooled, "pooled_on_side": pooled_side,
                    "cells_are": CELLS_ARE, "cells": cells, "halves_are": HALVES_ARE, "split_half": split,
                    "split_half_replicated": replicated, "paraphrase_families": paraphrase_families(params),
                    "strengths": {arm: c.strength for arm, c in strengths.choices.items()}},
    })
    atomic_write_json(paths.plot("stability"), [
        {"cell": f"seed {c['seed']} / paraphrase set {c['paraphrase_set']}", "sas_minus_dim": c["observed"],
         "holds": int(c["holds"]), "agrees": int(c["agrees"])} for c in cells]
        + [{"cell": f"split half {h['half']} ({h['n_sources']} sources)", "sas_minus_dim": min(h["sas_minus_dim"].values()),
            "holds": int(on_side(h["sas_minus_dim"], margin)), "agrees": int(h["agrees"])} for h in split])
    metrics = {"status": status, "share_agreeing": share, "n_cells": len(cells), "pooled_on_side": pooled_side,
               "split_half_replicated": replicated}
    atomic_write_json(paths.metrics("stability"), metrics)
    write_manifest(paths.manifest("stability"), "stability",
                   [paths.gate(GATE), paths.metrics("stability"), paths.plot("stability")], paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("stability", run)
