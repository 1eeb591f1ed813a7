"""Build valid gate records for the decision tests (constructed inputs, the real GateRecord schema)."""

from __future__ import annotations

from sasgate.gates import GATE_SCHEMA, GateRecord, validate_gate

TUPLES = [{"model": "toy-refusal", "layer": 0, "site": "resid_pre"},
          {"model": "toy-refusal", "layer": 1, "site": "resid_post"}]
RULE_TEXT = {"K1": "Stop after the budget.", "K2": "Stop when a tuple has no candidate.",
             "K3": "Stop when every candidate failed."}
RULE_KIND = {"K1": "budget", "K2": "coverage", "K3": "exhausted"}


def gate(name: str, status: str, *, per_tuple: list | None = None, details: dict | None = None,
         metric: str = "agreement", threshold: float | None = None, comparison: str | None = None) -> GateRecord:
    return validate_gate({"schema": GATE_SCHEMA, "gate": name, "status": status, "metric": metric,
                          "threshold": threshold, "comparison": comparison, "per_tuple": per_tuple or [],
                          "inputs": {}, "params": {}, "reason": f"{name} {status}", "details": details})


def reconstruction(*observed: float, threshold: float = 0.12) -> GateRecord:
    rows = [{"tuple": t, "observed": v, "ci95": [v - 0.01, v + 0.01], "status": "pass" if v <= threshold else "fail"}
            for t, v in zip(TUPLES, observed)]
    status = "pass" if all(r["status"] == "pass" for r in rows) else "fail"
    return gate("reconstruction", status, per_tuple=rows, metric="nmse", threshold=threshold, comparison="<=")


def remediation(outcome: str, rule: str = "K2", hub: str = "unavailable: hub unreachable (test)") -> GateRecord:
    """outcome: not_needed, found (status pass) or stopped (status fail, stopped by `rule`)."""
    status = {"not_needed": "not_needed", "found": "pass", "stopped": "fail"}[outcome]
    rows = [{"tuple": t, "observed": None, "ci95": None, "status": status} for t in TUPLES]
    details = None
    if outcome != "not_needed":
        details = {"stopped_by": ({"id": rule, "kind": RULE_KIND[rule], "text": RULE_TEXT[rule]}
                                  if outcome == "stopped" else None),
                   "coverage": {"A": {"available": True, "covered": 0, "required": 2, "text": "0/2"},
                                "B": {"available": False, "covered": None, "required": 2, "text": hub}}}
    return gate("remediation", status, per_tuple=rows, details=details, metric="nmse", threshold=0.12, comparison="<=")


def behaviour(status: str = "pass") -> GateRecord:
    return gate("behaviour", status, metric="scorer_agreement", threshold=0.95, comparison=">=")


def stability(status: str = "pass", declared: int | None = None, stable: int | None = None) -> GateRecord:
    """`declared` paraphrase families besides the original wording (set 0), of which the first `stable`
    agree with the pooled decision in every seed; None: a record without cells."""
    cells = [{"seed": seed, "paraphrase_set": p, "agrees": p == 0 or p <= (stable or 0)}
             for seed in (0, 1) for p in range((declared or 0) + 1)]
    details = None if declared is None else {"cells": cells}
    return gate("stability", status, metric="cell_agreement", threshold=0.8, comparison=">=", details=details)
