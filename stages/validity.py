"""`validity`: the behaviour gate ("decision-valid"), gates/behaviour.json.

The gate passes only when all three hold:

1. the scorer in use agrees with the labelled check set (data/scorer_check.jsonl, locked) at
   least `validity.min_agreement`;
2. every compared condition (the baseline, and every coefficient of every intervention on the
   class it is judged on) has at least `validity.min_samples` scored generations;
3. the SAS-vs-DIM comparison has finite bootstrap CIs (`validity.bootstrap_samples` resamples
   of paired units, at `validity.ci_level`).

The record states the decision, "SAS matches or beats DIM within margin m", with its CIs, at
matched side-effect budgets (sasgate.behaviour). The gate's status is about whether the
decision can be trusted, not about which method wins: SAS losing to DIM is a valid result.

Plots (dvc.yaml): steering curves with bootstrap CI bounds (induce: refusal on harmless prompts
under addition; bypass: refusal on harmful prompts under ablation), KL side effect per setting,
and the check-set agreement of every released scorer version.
"""

from __future__ import annotations

import math
from typing import Any

from sasgate import behaviour
from sasgate.artifacts import atomic_write_json, write_manifest
from sasgate.gates import GATE_SCHEMA, compare, input_digests, write_gate
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

GATE = "behaviour"
PLOTS = ("steering_induce", "steering_bypass", "side_effects", "scorer_agreement")


def compared_conditions(table: dict) -> list[behaviour.Cond]:
    """The baseline of each class and every intervention setting on the class it is judged on."""
    judged = {f"{m}_{verb}": label for verb, label, _ in behaviour.KINDS.values() for m in behaviour.METHODS}
    return sorted(c for c in table if c[0] == behaviour.BASELINE or judged.get(c[0]) == c[2])


def curve_rows(table: dict, cis: dict, kind: str) -> list[dict[str, Any]]:
    """Rows for one steering-curve plot (template .dvc/plots/ci_band.json): one per method and coefficient
    (0 = the unsteered baseline), with the refusal rate and its bootstrap CI bounds."""
    verb, label, _ = behaviour.KINDS[kind]
    base = (behaviour.BASELINE, 0.0, label)
    rates = {c: k / n for c, (k, n) in behaviour.rates(table).items()}
    out = []
    for m in behaviour.METHODS:
        coefs = sorted(c[1] for c in table if c[0] == f"{m}_{verb}" and c[2] == label)
        for coef in [0.0, *coefs]:
            cond = base if coef == 0.0 else (f"{m}_{verb}", coef, label)
            lo, hi = cis[cond]
            out.append({"method": m.upper(), "coefficient": coef, "rate": rates[cond], "lo": lo, "hi": hi})
    return out


def scorer_reports(params: Params, paths: Paths) -> tuple[dict[str, Any], list]:
    """Check-set agreement of every released scorer version, and the check-set files read."""
    from sasgate.scorers import RELEASED, agreement, load_check_set, load_scorer

    items = load_check_set(paths)
    reports = {}
    for v in sorted(set(RELEASED) | {params.score.version}):
        rep = agreement(load_scorer(v, paths.scorer_versions), items)
        reports[v] = {"version": rep.version, "sha256": rep.sha256, "n": rep.n, "agreement": rep.agreement,
                      "per_kind": rep.per_kind, "confusion": rep.confusion, "n_disagreements": len(rep.disagreements)}
    files = sorted(p for p in paths.data.glob("scorer_check*") if p.is_file())
    return reports, files


def run(params: Params, paths: Paths) -> dict[str, Any]:
    vp = params.validity
    rows, table, side, choices = behaviour.load_scored(params, paths)
    reports, check_files = scorer_reports(params, paths)
    used = reports[params.score.version]

    decision = behaviour.decide(table, choices, vp.margin, vp.bootstrap_samples, vp.bootstrap_seed, vp.ci_level)
    counts = behaviour.rates(table)
    compared = compared_conditions(table)
    small = [{"intervention": c[0], "coefficient": c[1], "label": c[2], "n": counts[c][1]}
             for c in compared if counts[c][1] < vp.min_samples]
    cis = [decision["ci"]] + [k["sas_minus_dim_ci"] for k in decision["per_kind"].values()]
    ci_ok = all(math.isfinite(x) for ci in cis for x in ci) and all(
        k["n_units"] >= 2 for k in decision["per_kind"].values())
    checks = {
        "scorer_agreement": {"observed": used["agreement"], "threshold": vp.min_agreement, "comparison": ">=",
                             "scorer": params.score.version,
                             "pass": compare(used["agreement"], ">=", vp.min_agreement)},
        "min_samples": {"observed": min(counts[c][1] for c in compared), "threshold": vp.min_samples,
                        "comparison": ">=", "n_conditions": len(compared), "below": small, "pass": not small},
        "bootstrap_ci": {"samples": vp.bootstrap_samples, "seed": vp.bootstrap_seed, "level": vp.ci_level,
                         "pass": ci_ok},
    }
    failed = [name for name, c in checks.items() if not c["pass"]]
    status = "fail" if failed else "pass"
    if failed:
        why = {"scorer_agreement": f"scorer {params.score.version} agrees with the check set "
                                   f"{used['agreement']:.3f} < {vp.min_agreement}",
               "min_samples": f"{len(small)} compared condition(s) have fewer than {vp.min_samples} samples "
                              f"(smallest {checks['min_samples']['observed']})",
               "bootstrap_ci": "the SAS-vs-DIM comparison has no finite bootstrap CI"}
        reason = "not decision-valid: " + "; ".join(why[f] for f in failed)
    else:
        reason = (f"decision-valid: scorer {params.score.version} agreement {used['agreement']:.3f} >= "
                  f"{vp.min_agreement}, every compared condition has >= {vp.min_samples} samples, bootstrap CIs "
                  f"computed; decision: '{decision['statement']}' is {str(decision['holds']).lower()} "
                  f"(min SAS - DIM effect {decision['observed']:+.3f}, {vp.ci_level:.0%} CI "
                  f"[{decision['ci'][0]:+.3f}, {decision['ci'][1]:+.3f}])")
    inputs = input_digests(paths.root, [paths.score_dir / behaviour.SCORES_FILE,
                                        paths.steer_dir / behaviour.SIDE_EFFECTS_FILE, *check_files])
    write_gate(paths.gate(GATE), {
        "schema": GATE_SCHEMA, "gate": GATE, "status": status,
        "metric": "scorer_agreement", "threshold": vp.min_agreement, "comparison": ">=",
        "per_tuple": [{"tuple": behaviour.sas_tuple_ref(params, rows), "observed": decision["observed"],
                       "ci95": decision["ci"], "status": status,
                       "extra": {"quantity": "min over induce/bypass of effect(SAS) - effect(DIM)",
                                 "decision_holds": decision["holds"]}}],
        "inputs": inputs, "params": params.section("score", "steer", "validity"), "reason": reason,
        "details": {"checks": checks, "decision": decision, "scorers": reports,
                    "side_effect_budget": {"kl": vp.side_effect_budget, "perplexity_ratio": vp.perplexity_budget},
                    "admissible_coefficients": {k: {m: c.admissible for m, c in v.items()} for k, v in choices.items()}},
    })

    rate_ci = behaviour.rate_cis(table, vp.bootstrap_samples, vp.bootstrap_seed, vp.ci_level)
    atomic_write_json(paths.plot("steering_induce"), curve_rows(table, rate_ci, "induce"))
    atomic_write_json(paths.plot("steering_bypass"), curve_rows(table, rate_ci, "bypass"))
    atomic_write_json(paths.plot("side_effects"), [
        {"setting": f"{i} {c:g}", "kl": v.kl, "kl_prompts": behaviour.off_target_label(i),
         "perplexity_ratio": v.perplexity_ratio}
        for (i, c), v in sorted(side.items()) if i != behaviour.BASELINE])
    atomic_write_json(paths.plot("scorer_agreement"), [{"version": v, "agreement": r["agreement"]}
                                                       for v, r in sorted(reports.items())])
    metrics = {"status": status, "failed_checks": failed, "decision_holds": decision["holds"],
               "sas_minus_dim": decision["observed"], "sas_minus_dim_ci": decision["ci"],
               "scorer_agreement": {v: r["agreement"] for v, r in reports.items()},
               "per_kind": {k: {"coefficients": v["coefficients"], "effect": v["effect"],
                                "sas_minus_dim": v["sas_minus_dim"], "sas_minus_dim_ci": v["sas_minus_dim_ci"]}
                            for k, v in decision["per_kind"].items()}}
    atomic_write_json(paths.metrics("validity"), metrics)
    outs = [paths.gate(GATE), paths.metrics("validity"), *(paths.plot(p) for p in PLOTS)]
    write_manifest(paths.manifest("validity"), "validity", outs, paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("validity", run)
