"""`calibrate`: each arm's steering strength, chosen on the selection split before the eval split is steered.

AxBench's protocol: a strength is a choice, so it is made on held-out selection prompts and judged on
the eval split. For every arm (DIM and SAS under addition and directional ablation, latent-level SAS)
and every strength of its grid, this stage generates on the selection prompts of the class the arm is
judged on (every paraphrase set and seed; the baseline on both classes), scores the generations with
the locked scorer, and measures the side effect on the text the arm should leave alone
(sasgate.steering). Each arm takes the strength with the largest selection effect whose side effect
is within `validity.side_effect_budget`; an arm with none is recorded as such (strength null), never
silently put at the baseline. `steer` reads this file, so by the DAG the eval split is generated and
scored only after the strengths are fixed; the eval split is never read here.

Outputs: artifacts/calibrate/ (strengths.json: every arm's choice with the selection figures it was
chosen on; scores.jsonl: the scored selection generations; side_effects.json), metrics/calibrate.json,
manifests/calibrate.json.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from sasgate import behaviour, steering
from sasgate.activations import split_items
from sasgate.artifacts import atomic_dir, atomic_write_json, write_manifest
from sasgate.modeling import load_chat_model
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.scorers import checked_scorer
from sasgate.stage_runner import stage_main


def scored(rows: list[dict[str, Any]], scorer: Any) -> list[behaviour.ScoreRow]:
    return [behaviour.ScoreRow(**r, refusal=bool(scorer.score(r["completion"])), scorer_version=scorer.version,
                               scorer_sha256=scorer.sha256) for r in rows]


def run(params: Params, paths: Paths) -> dict[str, Any]:
    scorer = checked_scorer(params.score.version, paths.scorer_versions)
    items = split_items(paths, "selection")
    by_label = {lab: [it for it in items if it.label == lab] for lab in behaviour.LABELS}
    chat = load_chat_model(params, paths)
    tp, _, _ = steering.sas_target(params, paths)
    resid_norm = steering.mean_resid_norm(paths, tp)
    settings = steering.build_settings(params, chat, paths, resid_norm)

    rows: list[behaviour.ScoreRow] = []
    for s in tqdm(settings, desc="calibrate: generating on selection", unit="setting", leave=False):
        labels = behaviour.LABELS if s.arm == behaviour.BASELINE else (behaviour.KINDS[behaviour.ARMS[s.arm].kind].judged_on,)
        for lab in labels:
            rows += scored(steering.generate(chat, params, s, by_label[lab]), scorer)
    table = behaviour.outcomes(rows)

    completions = steering.baseline_completions(paths)
    texts = {lab: steering.OffTargetText(chat, by_label[lab], completions, params.steer.batch_size)
             for lab in behaviour.LABELS}
    side = steering.side_effects(settings, texts)
    budget = params.validity.side_effect_budget
    choices = {}
    for arm in behaviour.ARMS:
        grid = sorted(s.strength for s in settings if s.arm == arm)
        effects, n_units = behaviour.effects_by_strength(table, arm, grid)
        kl = {r.strength: r.side_effect for r in side if r.arm == arm}
        choices[arm] = behaviour.choose_strength(arm, effects, kl, n_units, budget)
    record = behaviour.Strengths(schema=behaviour.STRENGTHS_SCHEMA, hook=tp.hook_name, resid_norm=resid_norm,
                                 side_effect_measure=steering.SIDE_EFFECT_MEASURE, choices=choices)

    with atomic_dir(paths.calibrate_dir) as tmp:
        atomic_write_json(tmp / behaviour.STRENGTHS_FILE, record.model_dump(mode="json", by_alias=True))
        behaviour.write_jsonl(tmp / behaviour.SCORES_FILE, (r.model_dump(mode="json") for r in rows))
        atomic_write_json(tmp / behaviour.SIDE_EFFECTS_FILE, behaviour.SideEffects(
            split="selection", measure=steering.SIDE_EFFECT_MEASURE,
            n_prompts={lab: t.n_prompts for lab, t in texts.items()},
            n_tokens={lab: t.n_tokens for lab, t in texts.items()}, settings=side).model_dump(mode="json"))
    metrics = {"hook": tp.hook_name, "resid_norm": resid_norm, "budget": budget,
               "chosen": {arm: {"strength": c.strength, "selection_effect": c.effect, "side_effect": c.side_effect}
                          for arm, c in choices.items()}}
    atomic_write_json(paths.metrics("calibrate"), metrics)
    write_manifest(paths.manifest("calibrate"), "calibrate", [paths.calibrate_dir, paths.metrics("calibrate")],
                   paths.root)
    return metrics


if __name__ == "__main__":
    stage_main("calibrate", run)
