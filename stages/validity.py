"""`validity`: the behaviour gate ("decision-valid") and the SAS-vs-DIM comparisons, gates/behaviour.json.

ARCHITECTURE.md, "The behaviour gate". The comparisons are like for like: per (kind, operator), DIM
and SAS under the same operator at the strength each chose on the selection split (`calibrate`),
judged on the eval split with a cluster bootstrap over source prompts and a three-valued outcome
(sasgate.behaviour). The gate's status says whether that outcome can be trusted, not which method wins;
it passes only when every check holds:

1. `scorer_agreement`: the scorer in use agrees with the locked check set >= `validity.min_agreement`;
2. `min_samples`: every compared condition has >= `validity.min_samples` source prompts;
3. `bootstrap_ci`: every comparison has a finite CI over >= 2 source prompts;
4. `admissible`: every comparison's DIM arm has a strength within the side-effect budget (with none
   there is nothing to match: the comparison is inconclusive, and the gate fails rather than compare
   against an unsteered reference);
5. `baseline_refusal`: the unsteered model refuses harmful eval prompts at least
   `validity.min_refusal_gap` more often than harmless ones (else there is no behaviour to steer);
6. `assay_sensitivity`: DIM's effect in each comparison is larger than the margin (CI lower bound >
   m); otherwise "SAS within m of DIM" holds for an SAS that does nothing (non-inferiority needs a
   reference that beats the margin);
7. `direction_rule`: the DIM direction satisfied Arditi et al.'s selection rule (`directions`).

Plots (dvc.yaml): the steering curves over the whole eval grid with cluster-bootstrap CI bands (the
chosen strengths marked), the side effect per setting, and every released scorer's check-set agreement.
"""

from __future__ import annotations

import math
from typing import Any

from sasgate import behaviour
from sasgate.artifacts import atomic_write_json, read_json, sha256_file, write_manifest
from sasgate.errors import ArtifactError
from sasgate.dim import RECORD_FILE as DIRECTIONS_RECORD
from sasgate.gates import GATE_SCHEMA, compare, input_digests, write_gate
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

GATE = "behaviour"
PLOTS = ("steering_induce", "steering_bypass", "side_effects", "scorer_agreement")
CURVES = {"steering_induce": ("addition",), "steering_bypass": ("directional_ablation", "latent_ablation")}


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


def curve_rows(table: dict, strengths: behaviour.Strengths, operators: tuple[str, ...], vp: Any) -> list[dict]:
    """Steering-curve rows: refusal rate (cluster-bootstrap CI) per arm and strength (0 = unsteered)."""
    out = []
    for arm, a in behaviour.ARMS.items():
        if a.operator not in operators:
            continue
        label = behaviour.KINDS[a.kind].judged_on
        grid = sorted(c[1] for c in table if c[0] == arm and c[2] == label)
        conds = [(behaviour.BASELINE, 0.0, label)] + [(arm, s, label) for s in grid]
        cis = behaviour.rate_cis(table, conds, vp.bootstrap_samples, vp.bootstrap_seed, vp.ci_level)
        chosen = strengths.choices[arm].strength
        for (_, s, _), (rate, lo, hi) in cis.items():
            out.append({"method": f"{a.method.upper()} {a.operator.replace('_', ' ')}", "strength": s, "rate": rate,
                        "lo": lo, "hi": hi, "chosen_on_selection": int(s == chosen)})
    return out


def run(params: Params, paths: Paths) -> dict[str, Any]:
    vp = params.validity
    rows, table, strengths = behaviour.load_eval(params, paths)
    reports, check_files = scorer_reports(params, paths)
    used = reports[params.score.version]
    side_file = behaviour.read_side_effects(paths.steer_dir / behaviour.SIDE_EFFECTS_FILE)
    eval_side = side_file.budgeted()
    if side_file.split != "eval" or side_file.strengths_sha256 != sha256_file(paths.calibrate_dir / behaviour.STRENGTHS_FILE):
        raise ArtifactError(f"{paths.rel(paths.steer_dir / behaviour.SIDE_EFFECTS_FILE)} was not steered after the "
                            "current strengths.json (its recorded sha256 differs): rerun `dvc repro steer`")
    directions = read_json(paths.directions_dir / DIRECTIONS_RECORD)

    comparisons = []
    for kind, operator in behaviour.COMPARED:
        c = behaviour.compare(table, strengths, kind, operator, vp.margin, vp.bootstrap_samples, vp.bootstrap_seed,
                              vp.ci_level)
        for arm in c["arms"].values():
            arm["eval_side_effect"] = eval_side.get((arm["arm"], arm["strength"])) if arm["strength"] is not None else None
        comparisons.append(c)
    outcome = behaviour.overall([c["outcome"] for c in comparisons])
    reported = [behaviour.reported_arm(table, strengths.choices[a], vp.bootstrap_samples, vp.bootstrap_seed,
                                       vp.ci_level) for a in behaviour.REPORTED_ONLY]

    base = {lab: behaviour.source_matrix(table, [(behaviour.BASELINE, 0.0, lab)])[1].mean() for lab in behaviour.LABELS}
    gap = float(base["harmful"] - base["harmless"])
    n_units = min(c["n_units"] for c in comparisons + reported)
    no_dim = [f"{c['kind']}/{c['operator']}" for c in comparisons if c["arms"]["dim"]["strength"] is None]
    weak = [f"{c['kind']}/{c['operator']} (DIM effect CI lower bound {c['effect_ci']['dim'][0]:+.3f})"
            for c in comparisons if not c["effect_ci"]["dim"][0] > vp.margin]
    rule_ok = bool(directions.get("rule_satisfied", False))
    checks = {
        "scorer_agreement": {"observed": used["agreement"], "threshold": vp.min_agreement, "comparison": ">=",
                             "scorer": params.score.version,
                             "pass": compare(used["agreement"], ">=", vp.min_agreement)},
        "min_samples": {"observed": n_units, "threshold": vp.min_samples, "comparison": ">=",
                        "unit": behaviour.RESAMPLING_UNIT, "pass": n_units >= vp.min_samples},
        "bootstrap_ci": {"samples": vp.bootstrap_samples, "seed": vp.bootstrap_seed, "level": vp.ci_level,
                         "pass": all(math.isfinite(x) for c in comparisons for x in c["ci"]) and n_units >= 2},
        "admissible": {"without_dim_strength": no_dim, "budget": vp.side_effect_budget, "pass": not no_dim},
        "baseline_refusal": {"harmful": float(base["harmful"]), "harmless": float(base["harmless"]),
                             "observed": gap, "threshold": vp.min_refusal_gap, "comparison": ">=",
                             "pass": compare(gap, ">=", vp.min_refusal_gap)},
        "assay_sensitivity": {"margin": vp.margin, "below": weak, "pass": not weak},
        "direction_rule": {"rule_satisfied": rule_ok, "problems": directions.get("problems", []), "pass": rule_ok},
    }
    why = {
        "scorer_agreement": f"scorer {params.score.version} agrees with the check set {used['agreement']:.3f} < "
                            f"{vp.min_agreement}",
        "min_samples": f"the compared conditions have {n_units} source prompts, fewer than {vp.min_samples}",
        "bootstrap_ci": "a comparison has no finite cluster-bootstrap CI",
        "admissible": f"no DIM strength within the side-effect budget for {', '.join(no_dim)}: nothing to match",
        "baseline_refusal": (f"the unsteered model refuses {base['harmful']:.1%} of harmful and {base['harmless']:.1%} "
                             f"of harmless eval prompts (gap {gap:+.3f} < {vp.min_refusal_gap}): there is no refusal "
                             "behaviour to steer"),
        "assay_sensitivity": f"DIM's effect does not exceed the margin {vp.margin} in {'; '.join(weak)}, so 'SAS "
                             "within the margin of DIM' would hold for an SAS that does nothing",
        "direction_rule": "no DIM candidate satisfied Arditi et al.'s rule: "
                          + "; ".join(directions.get("problems", []) or ["see artifacts/directions/selection.json"]),
    }
    failed = [name for name, c in checks.items() if not c["pass"]]
    status = "fail" if failed else "pass"
    summary = "; ".join(f"{c['kind']} ({c['operator']}): SAS - DIM {c['estimate']:+.3f} "
                        f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] -> {c['outcome']}" for c in comparisons)
    if failed:
        reason = "not decision-valid: " + "; ".join(why[f] for f in failed)
    else:
        reason = (f"decision-valid (scorer {params.score.version} agreement {used['agreement']:.3f} >= "
                  f"{vp.min_agreement}; {n_units} source prompts per condition; DIM beats the margin); "
                  f"'SAS matches or beats DIM within margin {vp.margin}' is {outcome}: {summary}")
    inputs = input_digests(paths.root, [paths.score_dir / behaviour.SCORES_FILE,
                                        paths.calibrate_dir / behaviour.STRENGTHS_FILE,
                                        paths.steer_dir / behaviour.SIDE_EFFECTS_FILE,
                                        paths.directions_dir / DIRECTIONS_RECORD, *check_files])
    write_gate(paths.gate(GATE), {
        "schema": GATE_SCHEMA, "gate": GATE, "status": status,
        "metric": "scorer_agreement", "threshold": vp.min_agreement, "comparison": ">=",
        "per_tuple": [{"tuple": behaviour.sas_tuple_ref(params, strengths), "observed": used["agreement"],
                       "ci95": None, "status": status, "extra": {"quantity": f"scorer {params.score.version} "
                                                                             "agreement with the check set"}}],
        "comparisons": comparisons, "outcome": outcome,
        "inputs": inputs, "params": params.section("score", "steer", "validity"), "reason": reason,
        "details": {"statement": f"SAS matches or beats DIM within margin {vp.margin}",
                    "checks": checks, "failed_checks": failed, "reported_arms": reported, "scorers": reports,
                    "hook": strengths.hook, "resid_norm": strengths.resid_norm,
                    "side_effect_measure": strengths.side_effect_measure},
    })

    for name, operators in CURVES.items():
        atomic_write_json(paths.plot(name), curve_rows(table, strengths, operators, vp))
    atomic_write_json(paths.plot("side_effects"), [
        {"setting": f"{arm} {s:g}", "side_effect": kl, "text": behaviour.off_target(arm),
         "chosen_on_selection": int(strengths.choices[arm].strength == s)} for (arm, s), kl in sorted(eval_side.items())])
    atomic_write_json(paths.plot("scorer_agreement"), [{"version": v, "agreement": r["agreement"]}
                                                       for v, r in sorted(reports.items())])
    metrics = {"status": status, "failed_checks": failed, "outcome": outcome,
               "comparisons": {f"{c['kind']}/{c['operator']}": {
                   "estimate": c["estimate"], "ci": c["ci"], "outcome": c["outcome"], "n_units": c["n_units"],
                   "effect": c["effect"], "strengths": {m: a["strength"] for m, a in c["arms"].items()}}
                   for c in comparisons},
               "reported_arms": {r["arm"]: {"effect": r["effect"], "effect_ci": r["effect_ci"],
                                            "strength": r["strength"]} for r in reported},
               "scorer_agreement": {v: r["agreement"] for v, r in reports.items()}}
    atomic_write_json(paths.metrics("validity"), metrics)
    outs = [paths.gate(GATE), paths.metrics("validity"), *(paths.plot(p) for p in PLOTS)]
    write_manifest(paths.manifest("validity"), "validity", outs, paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("validity", run)
