"""Build consistent gate records for the decision tests (constructed inputs, the real GateRecord schema).

Every builder returns a record that passes `sasgate.consistency`: its status follows from its rows, so a
test that mutates one field sees exactly that mutation refused.
"""

from __future__ import annotations

from sasgate.behaviour import COMPARED, overall, three_valued
from sasgate.gates import GATE_SCHEMA, GateRecord, validate_gate

TUPLES = [{"model": "toy-refusal", "layer": 0, "site": "resid_pre"},
          {"model": "toy-refusal", "layer": 1, "site": "resid_post"}]
RULE_TEXT = {"K1": "Stop after the budget.", "K2": "Stop when a tuple has no candidate.",
             "K3": "Stop when every candidate failed."}
RULE_KIND = {"K1": "budget", "K2": "coverage", "K3": "exhausted"}
MARGIN = 0.1


def gate(name: str, status: str, *, per_tuple: list | None = None, details: dict | None = None,
         metric: str = "agreement", threshold: float | None = None, comparison: str | None = None,
         params: dict | None = None, **extra) -> GateRecord:
    return validate_gate({"schema": GATE_SCHEMA, "gate": name, "status": status, "metric": metric,
                          "threshold": threshold, "comparison": comparison, "per_tuple": per_tuple or [],
                          "inputs": {}, "params": params or {}, "reason": f"{name} {status}", "details": details,
                          **extra})


def reconstruction(*observed: float, threshold: float = 0.12) -> GateRecord:
    rows = [{"tuple": t, "observed": v, "ci95": [v - 0.01, v + 0.01], "status": "pass" if v <= threshold else "fail"}
            for t, v in zip(TUPLES, observed)]
    status = "pass" if all(r["status"] == "pass" for r in rows) else "fail"
    return gate("reconstruction", status, per_tuple=rows, metric="nmse", threshold=threshold, comparison="<=")


def reconstruction_judged(observed: list[float], kl_div: list[float], *, threshold: float = 0.12,
                          criteria: list[dict] | None = None) -> GateRecord:
    """A reconstruction record as the stage writes it since issue 15: every row with `metrics` and the
    `criteria` it judged (nMSE first, then `criteria`, default `kl_div_score >= 0.99`), statuses from them."""
    from sasgate.gates import compare

    criteria = [{"metric": "kl_div_score", "comparison": ">=", "threshold": 0.99}] if criteria is None else criteria
    rows = []
    for t, v, kl in zip(TUPLES, observed, kl_div):
        metrics = {"nmse": v, "kl_div_score": kl, "ce_loss_score": kl}
        judged = [{"metric": "nmse", "comparison": "<=", "threshold": threshold}, *criteria]
        crit = [{**c, "observed": metrics[c["metric"]], "pass": compare(metrics[c["metric"]], c["comparison"],
                                                                        c["threshold"])} for c in judged]
        rows.append({"tuple": t, "observed": v, "ci95": [v - 0.01, v + 0.01], "metrics": metrics, "criteria": crit,
                     "status": "pass" if all(c["pass"] for c in crit) else "fail"})
    status = "pass" if all(r["status"] == "pass" for r in rows) else "fail"
    return gate("reconstruction", status, per_tuple=rows, metric="nmse", threshold=threshold, comparison="<=",
                params={"reconstruction": {"threshold": threshold, "comparison": "<=", "criteria": criteria}})


def remediation(outcome: str, rule: str = "K2", hub: str = "unavailable: hub unreachable (test)",
                failing: tuple[int, ...] = (0, 1), threshold: float = 0.12) -> GateRecord:
    """outcome: not_needed, found (status pass) or stopped (status fail, stopped by `rule`); `failing`: the
    indexes of TUPLES that failed reconstruction (their rows pass or fail, the others are not_needed)."""
    status = {"not_needed": "not_needed", "found": "pass", "stopped": "fail"}[outcome]
    rows = []
    for i, t in enumerate(TUPLES):
        if outcome == "not_needed" or i not in failing:
            rows.append({"tuple": t, "observed": None, "ci95": None, "status": "not_needed"})
        elif outcome == "found":
            rows.append({"tuple": t, "observed": 0.05, "ci95": [0.04, 0.06], "status": "pass",
                         "extra": {"passing_candidate": f"path:candidates/{i}"}})
        else:
            rows.append({"tuple": t, "observed": None, "ci95": None, "status": "fail"})
    details = None
    if outcome != "not_needed":
        details = {"stopped_by": ({"id": rule, "kind": RULE_KIND[rule], "text": RULE_TEXT[rule]}
                                  if outcome == "stopped" else None),
                   "coverage": {"A": {"available": True, "covered": 0, "required": 2, "text": "0/2"},
                                "B": {"available": False, "covered": None, "required": 2, "text": hub}}}
    return gate("remediation", status, per_tuple=rows, details=details, metric="nmse", threshold=threshold,
                comparison="<=")


def comparison(kind: str, operator: str, ci: tuple[float, float], *, dim_strength: float | None = 1.0,
               sas_strength: float | None = 1.0, dim_effect_ci: tuple[float, float] = (0.6, 0.9),
               n_units: int = 64, margin: float = MARGIN) -> dict:
    """One comparison record whose outcome follows from its CI and arms (as sasgate.behaviour computes it)."""
    if dim_strength is None:
        outcome = "inconclusive"
    elif sas_strength is None:
        outcome = "fails"
    else:
        outcome = three_valued(ci, margin)

    def arm(method: str, s: float | None) -> dict:
        return {"arm": f"{method}_{'add' if operator == 'addition' else 'ablate'}", "strength": s,
                "selection_effect": None if s is None else 0.5, "selection_side_effect": None if s is None else 0.1,
                "eval_side_effect": None if s is None else 0.1, "reason": "test"}

    return {"kind": kind, "operator": operator, "judged_on": "harmless" if kind == "induce" else "harmful",
            "estimate": (ci[0] + ci[1]) / 2, "ci": list(ci), "margin": margin, "outcome": outcome, "reason": "test",
            "resampling_unit": "source_prompt", "n_units": n_units, "ci_level": 0.95, "bootstrap_samples": 100,
            "strength_chosen_on": "selection", "effect": {"dim": 0.75, "sas": 0.75 + (ci[0] + ci[1]) / 2},
            "effect_ci": {"dim": list(dim_effect_ci), "sas": [0.0, 1.0]}, "baseline_rate": 0.0,
            "arms": {"dim": arm("dim", dim_strength), "sas": arm("sas", sas_strength)}}


def behaviour(status: str = "pass", cis: tuple = ((-0.05, 0.05), (-0.05, 0.05)), tuple_ref: dict = TUPLES[1],
              **comparison_kw) -> GateRecord:
    """A behaviour record with one comparison per (kind, operator); its checks give `status`."""
    comps = [comparison(kind, op, ci, **comparison_kw) for (kind, op), ci in zip(COMPARED, cis)]
    admissible = all(c["arms"]["dim"]["strength"] is not None for c in comps)
    sensitive = all(c["effect_ci"]["dim"][0] > c["margin"] for c in comps)
    checks = {"scorer_agreement": {"observed": 0.99 if status == "pass" else 0.5, "threshold": 0.95,
                                   "pass": status == "pass"},
              "min_samples": {"pass": True}, "admissible": {"pass": admissible},
              "assay_sensitivity": {"pass": sensitive}}
    real = "pass" if all(c["pass"] for c in checks.values()) else "fail"
    row = {"tuple": tuple_ref, "observed": checks["scorer_agreement"]["observed"], "ci95": None, "status": real}
    return gate("behaviour", real, per_tuple=[row], metric="scorer_agreement", threshold=0.95, comparison=">=",
                details={"checks": checks}, params={"validity": {"margin": MARGIN, "min_samples": 50}},
                comparisons=comps, outcome=overall([c["outcome"] for c in comps]))


def stability(status: str = "pass", declared: int | None = None, stable: int | None = None,
              halves_agree: bool = True, tuple_ref: dict = TUPLES[1]) -> GateRecord:
    """`declared` paraphrase families besides the original wording (set 0), of which the first `stable`
    agree with the pooled result in every seed; None: two cells of the original wording. `status` fail makes
    every cell disagree."""
    n = declared or 0
    cells = [{"seed": seed, "paraphrase_set": p, "agrees": status == "pass" and (p == 0 or p <= (stable or 0))}
             for seed in (0, 1) for p in range(n + 1)]
    share = sum(c["agrees"] for c in cells) / len(cells)
    halves = [{"half": i, "agrees": halves_agree} for i in (0, 1)]
    families = [{"paraphrase_set": k, "made_by": f"template {k}", "held_out_from_training": False,
                 "held_out_from_selection": False} for k in range(1, n + 1)]
    real = "pass" if share >= 0.8 and halves_agree else "fail"
    row = {"tuple": tuple_ref, "observed": share, "ci95": None, "status": real}
    return gate("stability", real, per_tuple=[row], metric="cell_agreement", threshold=0.8, comparison=">=",
                details={"cells": cells, "split_half": halves, "paraphrase_families": families})
