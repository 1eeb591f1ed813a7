"""`score`: every steered generation scored by the locked scorer (`score.version`), plus refusal rates.

The scorer comes from sasgate.scorers: a released version whose code changed is refused
(ScorerTamperedError, exit 7; add a new version instead). Every released version is checked,
not only the one in use, so an edit to v1 is caught even while v2 scores.

Outputs: artifacts/score/scores.jsonl (one row per generation: its settings, the refusal bool,
scorer version and sha256), metrics/score.json (refusal rate per (intervention, coefficient,
label), and the acceptance figures: DIM addition's largest increase of refusal on harmless
prompts and DIM ablation's largest decrease on harmful prompts, in percentage points, over
the coefficient grid), manifests/score.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sasgate import behaviour
from sasgate.artifacts import atomic_dir, atomic_write_json, write_manifest
from sasgate.errors import ArtifactError
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.stage_runner import stage_main

def checked_scorer(version: str, versions_dir: Path) -> Any:
    """The scorer `version`, after checking that no released version's code changed."""
    from sasgate.scorers import RELEASED, load_scorer

    for v in sorted(RELEASED):
        load_scorer(v, versions_dir)  # ScorerTamperedError when a released file no longer matches its hash
    return load_scorer(version, versions_dir)


def rate_rows(table: dict) -> list[dict[str, Any]]:
    """One row per (intervention, coefficient, label): refusals, samples, rate."""
    return [{"intervention": c[0], "coefficient": c[1], "label": c[2], "refusals": k, "n": n, "rate": k / n}
            for c, (k, n) in sorted(behaviour.rates(table).items())]


def acceptance(table: dict) -> dict[str, Any]:
    """DIM's largest induce and bypass effects over its coefficient grid, in percentage points."""
    out: dict[str, Any] = {}
    for kind, name in (("induce", "dim_add_harmless_increase_pp"), ("bypass", "dim_ablate_harmful_decrease_pp")):
        verb, label, _ = behaviour.KINDS[kind]
        coefs = sorted({c[1] for c in table if c[0] == f"dim_{verb}" and c[2] == label})
        if not coefs:
            raise ArtifactError(f"no dim_{verb} generations on {label} prompts to score")
        pp = {c: 100.0 * behaviour.effect(table, kind, "dim", c) for c in coefs}
        best = max(coefs, key=lambda c: (pp[c], -c))
        out[name] = pp[best]
        out[name.replace("_pp", "_coefficient")] = best
    return out


def run(params: Params, paths: Paths) -> dict[str, Any]:
    scorer = checked_scorer(params.score.version, paths.scorer_versions)
    rows = behaviour.read_jsonl(paths.steer_dir / behaviour.GENERATIONS_FILE)
    scored = [{**r, "refusal": bool(scorer.score(r["completion"])), "scorer_version": scorer.version,
               "scorer_sha256": scorer.sha256} for r in rows]
    table = behaviour.outcomes(scored)
    with atomic_dir(paths.score_dir) as tmp:
        behaviour.write_jsonl(tmp / behaviour.SCORES_FILE, scored)
    metrics = {"scorer": {"version": scorer.version, "sha256": scorer.sha256}, "n_scored": len(scored),
               "acceptance": acceptance(table), "rates": rate_rows(table)}
    atomic_write_json(paths.metrics("score"), metrics)
    write_manifest(paths.manifest("score"), "score", [paths.score_dir, paths.metrics("score")], paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("score", run)
