"""`score`: every steered generation scored by the locked scorer (`score.version`), plus refusal rates.

The scorer comes from sasgate.scorers: a released version whose code changed is refused
(ScorerTamperedError, exit 7; add a new version instead). Every released version is checked,
not only the one in use, so an edit to v1 is caught even while v2 scores.

Outputs: artifacts/score/scores.jsonl (one row per generation: its settings, the refusal bool,
scorer version and sha256), metrics/score.json (refusal rate per (arm, strength, label), and
the acceptance figures: DIM addition's largest increase of refusal on harmless prompts and DIM
ablation's largest decrease on harmful prompts, in percentage points, over the grid), manifests/score.json.
"""

from __future__ import annotations

from typing import Any

from sasgate import behaviour
from sasgate.artifacts import atomic_dir, atomic_write_json, write_manifest
from sasgate.errors import ArtifactError
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.scorers import checked_scorer
from sasgate.stage_runner import stage_main


def rate_rows(table: dict) -> list[dict[str, Any]]:
    """One row per (arm, strength, label): refusals, generations, rate."""
    return [{"arm": c[0], "strength": c[1], "label": c[2], "refusals": k, "n": n, "rate": k / n}
            for c, (k, n) in sorted(behaviour.rates(table).items())]


def acceptance(table: dict) -> dict[str, Any]:
    """DIM's largest induce (addition) and bypass (directional ablation) effects over its grid, in points,
    on the eval split: the organism check that DIM steers at all (the gates judge the chosen strengths)."""
    out: dict[str, Any] = {}
    for arm, name in (("dim_add", "dim_add_harmless_increase_pp"), ("dim_ablate", "dim_ablate_harmful_decrease_pp")):
        label = behaviour.KINDS[behaviour.ARMS[arm].kind].judged_on
        grid = sorted({c[1] for c in table if c[0] == arm and c[2] == label})
        if not grid:
            raise ArtifactError(f"no {arm} generations on {label} prompts to score")
        effects, _ = behaviour.effects_by_strength(table, arm, grid)
        best = max(grid, key=lambda s: (effects[s], -s))
        out[name] = 100.0 * effects[best]
        out[name.replace("_pp", "_strength")] = best
    return out


def run(params: Params, paths: Paths) -> dict[str, Any]:
    scorer = checked_scorer(params.score.version, paths.scorer_versions)
    rows = behaviour.read_rows(paths.steer_dir / behaviour.GENERATIONS_FILE, behaviour.GenerationRow)
    scored = [behaviour.ScoreRow(**r.model_dump(), refusal=bool(scorer.score(r.completion)),
                                 scorer_version=scorer.version, scorer_sha256=scorer.sha256) for r in rows]
    table = behaviour.outcomes(scored)
    with atomic_dir(paths.score_dir) as tmp:
        behaviour.write_jsonl(tmp / behaviour.SCORES_FILE, (r.model_dump(mode="json") for r in scored))
    metrics = {"scorer": {"version": scorer.version, "sha256": scorer.sha256}, "n_scored": len(scored),
               "acceptance": acceptance(table), "rates": rate_rows(table)}
    atomic_write_json(paths.metrics("score"), metrics)
    write_manifest(paths.manifest("score"), "score", [paths.score_dir, paths.metrics("score")], paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("score", run)
