"""Behaviour statistics (sasgate.behaviour), the validity and stability gates on scored rows, and the steering arms.

Each test of ARCHITECTURE.md's behaviour rules feeds an input on which the old rule (point-estimate decision,
unit = generation, strengths chosen on the eval split, one arm per method) gives the wrong answer, and checks
the new one. Scored rows are built by hand with known refusal rates, so effects, strengths and outcomes can be
checked exactly; the gates are flipped by changing inputs or params only.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from sasgate import behaviour
from sasgate.artifacts import sha256_file
from sasgate.behaviour import ARMS, BASELINE, COMPARED, KINDS
from sasgate.errors import ArtifactError
from sasgate.params import parse_params
from sasgate.paths import Paths

REPO = Path(__file__).resolve().parents[1]
ADD, ABLATE = [0.5, 1.0], [0.5, 1.0]
GRID = {arm: (ADD if a.operator == "addition" else ABLATE) for arm, a in ARMS.items()}
HOOK = "blocks.1.hook_resid_post"
SHA = "0" * 64


def rows_for(rates: dict, n_sources: int = 20, seeds=(0, 1), psets=(0, 1), split: str = "eval",
             refuses=None) -> list[behaviour.ScoreRow]:
    """One ScoreRow per (condition, source, seed, paraphrase set). In every (seed, paraphrase set) cell the first
    round(rate * n_sources) sources of a condition refuse, unless `refuses(cond, source, seed, pset)` says."""
    out = []
    for (arm, s, label), rate in sorted(rates.items()):
        for seed in seeds:
            for p in psets:
                for i in range(n_sources):
                    refusal = refuses((arm, s, label), i, seed, p) if refuses else i < round(rate * n_sources)
                    out.append(behaviour.ScoreRow(
                        item_id=f"{split}/{label}/{i:03d}/p{p}", source_id=f"{label}:{i}", label=label, split=split,
                        paraphrase_set=p, seed=seed, arm=arm, strength=s, tuple=None, do_sample=True, temperature=0.7,
                        completion="", refusal=bool(refusal), scorer_version="v2", scorer_sha256=SHA))
    return out


def grid_rates(dim_add=(0.5, 1.0), sas_add=(0.5, 1.0), dim_ablate=(0.5, 0.0), sas_ablate=(0.5, 0.0),
               sas_latent_ablate=(0.8, 0.6), base=(1.0, 0.0)) -> dict:
    """Refusal rates of the whole grid on the class each arm is judged on; base = (harmful, harmless)."""
    rates = {(BASELINE, 0.0, "harmful"): base[0], (BASELINE, 0.0, "harmless"): base[1]}
    for arm, values in (("dim_add", dim_add), ("sas_add", sas_add), ("dim_ablate", dim_ablate),
                        ("sas_ablate", sas_ablate), ("sas_latent_ablate", sas_latent_ablate)):
        for s, v in zip(GRID[arm], values):
            rates[(arm, s, KINDS[ARMS[arm].kind].judged_on)] = v
    return rates


def table_of(rates, **kw):
    return behaviour.outcomes(rows_for(rates, **kw))


def strengths(chosen: dict | None = None, side: float = 0.1, budget: float = 0.25) -> behaviour.Strengths:
    """A strengths record choosing `chosen[arm]` (default: each arm's largest strength; None: inadmissible)."""
    chosen = {arm: GRID[arm][-1] for arm in ARMS} | (chosen or {})
    choices = {}
    for arm in ARMS:
        s = chosen[arm]
        effects = {x: 0.5 for x in GRID[arm]}
        sides = {x: (side if s is not None else budget * 10) for x in GRID[arm]}
        if s is not None:
            effects[s] = 0.9
        choices[arm] = behaviour.choose_strength(arm, effects, sides, 20, budget)
        assert choices[arm].strength == s
    return behaviour.Strengths(schema=behaviour.STRENGTHS_SCHEMA, hook=HOOK, resid_norm=2.0,
                               side_effect_measure="test", choices=choices)


def compare(table, st=None, kind="induce", operator="addition", margin=0.1, samples=400):
    return behaviour.compare(table, st or strengths(), kind, operator, margin, samples, 0, 0.95)


# --------------------------------------------------------------------------- typed rows, tables

def test_score_rows_are_typed_on_read_and_a_string_bool_is_refused(tmp_path):
    """`bool("false")` is True: an untyped reader counted that row as a refusal."""
    row = rows_for({(BASELINE, 0.0, "harmful"): 1.0}, n_sources=1, seeds=(0,), psets=(0,))[0].model_dump(mode="json")
    path = tmp_path / "scores.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "refusal": "false", "seed": 1}) + "\n")
    with pytest.raises(ArtifactError, match=r"line 2: refusal: Input should be a valid boolean"):
        behaviour.read_rows(path, behaviour.ScoreRow)
    path.write_text(json.dumps({**row, "arm": "vibes"}) + "\n")
    with pytest.raises(ArtifactError, match="unknown arm 'vibes'"):
        behaviour.read_rows(path, behaviour.ScoreRow)
    path.write_text("")
    with pytest.raises(ArtifactError, match="holds no rows"):
        behaviour.read_rows(path, behaviour.ScoreRow)


def test_side_effects_are_typed_and_the_budgeted_figure_must_be_the_off_target_kl():
    ok = {"arm": "dim_add", "strength": 1.0, "tuple": "L1.resid_post", "kl": {"harmful": 0.2, "harmless": 3.0},
          "ce_delta": {"harmful": 0.1, "harmless": 2.0}, "off_target": "harmful", "side_effect": 0.2}
    assert behaviour.SideEffect.model_validate(ok).side_effect == 0.2
    for bad, named in (({"side_effect": 3.0}, "KL on harmful text"), ({"off_target": "harmless"}, "KL on harmful"),
                       ({"kl": {"harmful": float("nan"), "harmless": 1.0}}, "finite"),
                       ({"kl": {"harmful": 0.2}}, "each of")):
        with pytest.raises(ValueError, match=named):
            behaviour.SideEffect.model_validate({**ok, **bad})


def test_outcomes_refuse_a_repeated_unit_and_name_an_incomplete_grid():
    rows = rows_for(grid_rates())
    with pytest.raises(ArtifactError, match="repeat"):
        behaviour.outcomes(rows + rows[:1])
    gappy = behaviour.outcomes([r for r in rows if not (r.arm == "sas_add" and r.source_id == "harmless:3")])
    with pytest.raises(ArtifactError, match="steering grid is incomplete"):
        behaviour.effects_by_strength(gappy, "sas_add", ADD)


def test_effects_are_induce_on_harmless_and_bypass_on_harmful_per_source():
    table = table_of(grid_rates(dim_add=(0.25, 0.75), dim_ablate=(0.5, 0.1), base=(0.9, 0.05)))
    induce, n = behaviour.effects_by_strength(table, "dim_add", ADD)
    assert induce == {0.5: pytest.approx(0.25 - 0.05), 1.0: pytest.approx(0.75 - 0.05)} and n == 20
    bypass, _ = behaviour.effects_by_strength(table, "dim_ablate", ABLATE)
    assert bypass[1.0] == pytest.approx(0.9 - 0.1)


# --------------------------------------------------------------------------- point 4: the resampling unit

def test_the_resampling_unit_is_the_source_prompt_not_the_generation():
    """20 sources, each generated 4 times (2 seeds x 2 paraphrase sets) with identical outcomes: 20 independent
    units, not 80. The old unit-level bootstrap counted 80 and gave a CI about half as wide."""
    rates = grid_rates(sas_add=(0.5, 0.6))
    pooled = compare(table_of(rates))
    one_each = compare(table_of(rates, seeds=(0,), psets=(0,)))  # the same per-source means, one generation each
    assert pooled["n_units"] == 20 and pooled["resampling_unit"] == "source_prompt"
    assert pooled["ci"] == one_each["ci"] and pooled["estimate"] == pytest.approx(0.6 - 1.0)
    # what the old rule did: resample the 80 (source, seed, paraphrase set) generations independently
    rows = rows_for(rates)
    naive = np.array([[float(r.refusal) for r in rows if r.arm == a and r.strength == 1.0 and r.label == "harmless"]
                      for a in ("dim_add", "sas_add")]).T
    draws = behaviour.bootstrap_means(naive, 400, np.random.default_rng(0))
    lo, hi = behaviour.percentile_ci(draws[:, 1] - draws[:, 0], 0.95)
    assert (hi - lo) < 0.7 * (pooled["ci"][1] - pooled["ci"][0])


# --------------------------------------------------------------------------- point 5: three-valued outcome

def test_the_margin_rule_is_three_valued_on_the_ci():
    assert behaviour.three_valued((-0.05, 0.02), 0.1) == "holds"
    assert behaviour.three_valued((-0.1, 0.02), 0.1) == "holds"  # lower bound at -m: within the margin
    assert behaviour.three_valued((-0.3, -0.15), 0.1) == "fails"
    assert behaviour.three_valued((-0.15, -0.02), 0.1) == "inconclusive"
    assert behaviour.overall(["holds", "holds"]) == "holds"
    assert behaviour.overall(["holds", "inconclusive"]) == "inconclusive"
    assert behaviour.overall(["inconclusive", "fails"]) == "fails"
    assert behaviour.overall([]) == "inconclusive"


def test_a_point_estimate_within_the_margin_whose_ci_straddles_it_is_inconclusive():
    """SAS induces on 23 of 25 sources where DIM induces on all: estimate -0.08 >= -0.1 (the old rule: 'holds'),
    but with 25 sources the CI reaches well below -0.1."""
    c = compare(table_of(grid_rates(sas_add=(0.5, 0.92)), n_sources=25))
    assert c["estimate"] == pytest.approx(-0.08) and c["estimate"] >= -0.1
    assert c["ci"][0] < -0.1 < c["ci"][1] and c["outcome"] == "inconclusive"
    assert compare(table_of(grid_rates(sas_add=(0.5, 0.2))))["outcome"] == "fails"
    assert compare(table_of(grid_rates()))["outcome"] == "holds"


# --------------------------------------------------------------------------- points 2, 3: strengths

def test_strengths_are_chosen_on_selection_and_the_eval_split_only_judges_them():
    """On selection DIM addition peaks at 0.5; on eval it would peak at 1.0. The record keeps 0.5, with the
    selection figures it was chosen on (the old rule picked the eval-optimal strength)."""
    selection = table_of(grid_rates(dim_add=(1.0, 0.6)), split="selection")
    effects, n = behaviour.effects_by_strength(selection, "dim_add", ADD)
    choice = behaviour.choose_strength("dim_add", effects, {0.5: 0.1, 1.0: 0.1}, n, 0.25)
    assert (choice.strength, choice.effect, choice.chosen_on) == (0.5, pytest.approx(1.0), "selection")
    st = strengths({"dim_add": 0.5})
    st = st.model_copy(update={"choices": {**st.choices, "dim_add": choice}})
    eval_table = table_of(grid_rates(dim_add=(0.6, 1.0)))
    eval_best = max(ADD, key=lambda s: behaviour.effects_by_strength(eval_table, "dim_add", ADD)[0][s])
    c = compare(eval_table, st)
    assert eval_best == 1.0 and c["arms"]["dim"]["strength"] == 0.5 != eval_best
    assert c["effect"]["dim"] == pytest.approx(0.6) and c["arms"]["dim"]["selection_effect"] == pytest.approx(1.0)
    assert c["strength_chosen_on"] == "selection"


def test_a_strength_is_admissible_by_its_off_target_side_effect_only():
    """The largest selection effect within the budget; ties go to the smaller strength; the perplexity of the
    steered completions (which punishes a clean refusal of a harmless prompt) is not an input at all."""
    c = behaviour.choose_strength("dim_add", {0.5: 0.4, 1.0: 0.9, 2.0: 1.0}, {0.5: 0.01, 1.0: 0.2, 2.0: 0.9}, 20, 0.25)
    assert (c.strength, [p.admissible for p in c.grid]) == (1.0, [True, True, False])
    tie = behaviour.choose_strength("sas_add", {0.5: 0.9, 1.0: 0.9}, {0.5: 0.0, 1.0: 0.0}, 20, 0.25)
    assert tie.strength == 0.5
    none = behaviour.choose_strength("sas_add", {0.5: 0.9}, {0.5: 1.0}, 20, 0.25)
    assert none.strength is None and "no strength within the side-effect budget 0.25" in none.reason


def test_no_admissible_strength_is_never_a_match():
    """Both arms at the baseline made both effects 0 and 'SAS matches DIM' held: a vacuous comparison."""
    table = table_of(grid_rates())
    no_sas = compare(table, strengths({"sas_add": None}))
    assert no_sas["outcome"] == "fails" and "no SAS strength" in no_sas["reason"]
    no_dim = compare(table, strengths({"dim_add": None, "sas_add": None}))
    assert no_dim["outcome"] == "inconclusive" and "no DIM strength" in no_dim["reason"]
    assert no_dim["effect"] == {"dim": 0.0, "sas": 0.0}  # what the old rule called a match


def test_latent_ablation_is_reported_and_never_compared_with_dim():
    assert ("bypass", "directional_ablation") in COMPARED and all(op != "latent_ablation" for _, op in COMPARED)
    assert {ARMS[behaviour.arm_name(m, op)].operator for _, op in COMPARED for m in ("dim", "sas")} == {
        "addition", "directional_ablation"}
    r = behaviour.reported_arm(table_of(grid_rates()), strengths().choices["sas_latent_ablate"], 200, 0, 0.95)
    assert r["compared"] is False and r["operator"] == "latent_ablation" and r["effect"] == pytest.approx(1.0 - 0.6)


# --------------------------------------------------------------------------- the gates, by inputs and params

def _params(**over):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["steer"].update(add_strengths=ADD, ablate_strengths=ABLATE, seeds=[0, 1])
    raw["validity"].update(min_samples=20, bootstrap_samples=200)
    raw["eval"]["n_paraphrases"] = 1
    raw["tuples"] = [{"layer": 1, "site": "resid_pre", "sae": "train"}, {"layer": 1, "site": "resid_post", "sae": "train"}]
    for section, values in over.items():
        raw[section].update(values)
    return parse_params(raw)


def scored(root: Path, rates: dict, st: behaviour.Strengths | None = None, rule_satisfied: bool = True,
           refuses=None) -> Paths:
    """A project root holding what validity and stability read: eval scores, strengths, side effects, the DIM
    record, the scorer check set."""
    paths = Paths.at(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name in ("scorer_check.jsonl", "scorer_check.lock"):
        shutil.copy2(REPO / "data" / name, root / "data" / name)
    if not paths.scorer_versions.exists():
        shutil.copytree(REPO / "sasgate" / "scorer_versions", paths.scorer_versions)
    for d in (paths.score_dir, paths.calibrate_dir, paths.steer_dir, paths.directions_dir):
        d.mkdir(parents=True, exist_ok=True)
    behaviour.write_jsonl(paths.score_dir / behaviour.SCORES_FILE,
                          (r.model_dump(mode="json") for r in rows_for(rates, refuses=refuses)))
    st = st or strengths()
    strengths_file = paths.calibrate_dir / behaviour.STRENGTHS_FILE
    strengths_file.write_text(json.dumps(st.model_dump(mode="json", by_alias=True)))
    side = [behaviour.SideEffect(arm=a, strength=s, tuple=None, kl={"harmful": 0.1, "harmless": 0.1},
                                 ce_delta={"harmful": 0.0, "harmless": 0.0}, off_target=behaviour.off_target(a),
                                 side_effect=0.1) for a in ARMS for s in GRID[a]]
    record = behaviour.SideEffects(split="eval", measure="test", strengths_sha256=sha256_file(strengths_file),
                                   n_prompts={"harmful": 20, "harmless": 20}, n_tokens={"harmful": 1, "harmless": 1},
                                   settings=side)
    (paths.steer_dir / behaviour.SIDE_EFFECTS_FILE).write_text(json.dumps(record.model_dump(mode="json")))
    (paths.directions_dir / "selection.json").write_text(json.dumps(
        {"rule_satisfied": rule_satisfied, "problems": [] if rule_satisfied else ["no candidate survives the rule"]}))
    return paths


def test_validity_gate_writes_the_comparisons_interface_and_passes(tmp_path):
    from sasgate.gates import read_gate
    from sasgate.stages import validity

    paths = scored(tmp_path, grid_rates())
    assert validity.run(_params(), paths)["status"] == "pass"
    rec = read_gate(paths.gate("behaviour"), "behaviour")
    assert rec.outcome == "holds" and [(c.kind, c.operator) for c in rec.comparisons] == list(COMPARED)
    for c in rec.comparisons:
        assert (c.resampling_unit, c.n_units, c.strength_chosen_on, c.margin) == ("source_prompt", 20, "selection", 0.1)
        assert c.arms["dim"].strength == c.arms["sas"].strength == 1.0 and c.arms["dim"].selection_side_effect == 0.1
        assert c.arms["dim"].eval_side_effect == 0.1 and c.ci[0] <= c.estimate <= c.ci[1]
    # point 9: the key figure is the scorer agreement the metric label names, not SAS - DIM
    assert rec.metric == "scorer_agreement" and rec.per_tuple[0].observed == rec.details["checks"][
        "scorer_agreement"]["observed"] >= 0.95
    induce = json.loads(paths.plot("steering_induce").read_text())
    assert [(r["method"], r["strength"], r["chosen_on_selection"]) for r in induce] == [
        ("DIM addition", 0.0, 0), ("DIM addition", 0.5, 0), ("DIM addition", 1.0, 1),
        ("SAS addition", 0.0, 0), ("SAS addition", 0.5, 0), ("SAS addition", 1.0, 1)]


def test_validity_gate_fails_on_the_scorer_and_counts_source_prompts(tmp_path):
    from sasgate.gates import read_gate
    from sasgate.stages import validity

    paths = scored(tmp_path, grid_rates())
    failed = validity.run(_params(score={"version": "v1"}), paths)
    assert (failed["status"], failed["failed_checks"]) == ("fail", ["scorer_agreement"])
    # 80 generations per condition (the old count) but 20 source prompts: min_samples 21 is not met
    failed = validity.run(_params(validity={"min_samples": 21}), paths)
    assert (failed["status"], failed["failed_checks"]) == ("fail", ["min_samples"])
    assert "20 source prompts, fewer than 21" in read_gate(paths.gate("behaviour")).reason


def test_a_reference_that_does_not_beat_the_margin_is_not_decision_valid(tmp_path):
    """DIM induces 5 points: 'SAS within 0.1 of DIM' holds for an SAS that does nothing (the old gate passed)."""
    from sasgate.gates import read_gate
    from sasgate.stages import validity

    paths = scored(tmp_path, grid_rates(dim_add=(0.0, 0.05), sas_add=(0.0, 0.0)))
    res = validity.run(_params(), paths)
    assert res["status"] == "fail" and res["failed_checks"] == ["assay_sensitivity"]
    assert "DIM's effect does not exceed the margin 0.1 in induce/addition" in read_gate(paths.gate("behaviour")).reason


def test_a_model_that_does_not_refuse_fails_the_gate_naming_its_baseline_rate(tmp_path):
    from sasgate.gates import read_gate
    from sasgate.stages import validity

    paths = scored(tmp_path, grid_rates(base=(0.05, 0.0), dim_ablate=(0.0, 0.0), sas_ablate=(0.0, 0.0),
                                        sas_latent_ablate=(0.0, 0.0)))
    res = validity.run(_params(), paths)
    assert "baseline_refusal" in res["failed_checks"] and res["status"] == "fail"
    assert "refuses 5.0% of harmful and 0.0% of harmless eval prompts" in read_gate(paths.gate("behaviour")).reason


def test_a_direction_that_failed_arditis_rule_fails_the_gate(tmp_path):
    from sasgate.stages import validity

    res = validity.run(_params(), scored(tmp_path, grid_rates(), rule_satisfied=False))
    assert res["failed_checks"] == ["direction_rule"]


def test_no_dim_strength_within_budget_fails_the_gate(tmp_path):
    from sasgate.stages import validity

    res = validity.run(_params(), scored(tmp_path, grid_rates(), strengths({"dim_add": None})))
    assert res["status"] == "fail" and res["failed_checks"] == ["admissible", "assay_sensitivity"]
    assert res["comparisons"]["induce/addition"]["outcome"] == "inconclusive"  # unsteered DIM: nothing to match


def test_stability_cells_and_a_split_half_that_cells_cannot_see(tmp_path):
    """Every (seed, paraphrase set) cell holds the same sources, so all agree with the pooled estimate; but SAS
    induces only on one half of the sources. The old gate passed; the split half replicates on other prompts
    and catches it."""
    from sasgate.gates import read_gate
    from sasgate.stages import stability

    paths = scored(tmp_path, grid_rates())
    ok = stability.run(_params(), paths)
    assert (ok["status"], ok["share_agreeing"], ok["n_cells"], ok["split_half_replicated"]) == ("pass", 1.0, 4, True)
    rec = read_gate(paths.gate("stability"))
    assert "other seeds and wordings, not other prompts" in rec.details["cells_are"]
    assert [f["paraphrase_set"] for f in rec.details["paraphrase_families"]] == [1]

    rows = rows_for(grid_rates())
    half = stability.halves(rows, 0)[0]

    def refuses(cond, i, seed, p):
        if cond[0] == "sas_add":  # SAS induces refusal on the sources of half 0 only
            return f"harmless:{i}" in half
        return i < round(grid_rates()[cond] * 20)

    paths = scored(tmp_path / "b", grid_rates(), refuses=refuses)
    res = stability.run(_params(), paths)
    rec = read_gate(paths.gate("stability"))
    assert res["share_agreeing"] == 1.0 and not res["split_half_replicated"] and res["status"] == "fail"
    assert [h["agrees"] for h in rec.details["split_half"]] == [False, True]


# --------------------------------------------------------------------------- point 6: DIM per Arditi et al.

def _items(n_sources=8, psets=2):
    from sasgate.evalset import EvalItem

    return [EvalItem(id=f"selection/{lab}/{i:03d}/p{p}", source_id=f"{lab}:{i}", split="selection", label=lab,
                     paraphrase_set=p, text=f"{lab} {i} {p}") for lab in ("harmful", "harmless")
            for i in range(n_sources) for p in range(psets)]


def test_the_selection_split_is_cut_by_source_into_build_and_validation():
    from sasgate.stages.directions import split_parts

    parts = split_parts(_items(), 0.625, 0)
    assert not parts["build"] & parts["validation"]
    assert len(parts["build"]) == 10 and len(parts["validation"]) == 6  # 5 + 3 sources per class
    assert split_parts(_items(), 0.625, 0) == parts and split_parts(_items(), 0.625, 1) != parts
    with pytest.raises(ArtifactError, match="needs at least 2"):
        split_parts(_items(n_sources=1), 0.5, 0)


def test_arditis_filter_drops_prompts_whose_baseline_score_contradicts_the_label():
    from sasgate.dim import contradicts_label

    assert contradicts_label(-0.5, harmful=True) and not contradicts_label(0.5, harmful=True)
    assert contradicts_label(0.5, harmful=False) and not contradicts_label(-0.5, harmful=False)


def test_no_surviving_candidate_is_flagged_not_crashed():
    from sasgate.dim import select
    from sasgate.params import DirectionsParams

    cands = [{"layer": 0, "position": -1, "norm": 1.0, "kl": 5.0, "induce_score": -1.0, "ablation_score": 0.0},
             {"layer": 1, "position": -1, "norm": 1.0, "kl": 0.01, "induce_score": -1.0, "ablation_score": 1.0}]
    annotated, chosen, satisfied = select(cands, 4, DirectionsParams())
    assert not satisfied and chosen == 1 and annotated[1]["reasons"] == [
        "addition does not induce refusal: induce score -1 < 0.0"]


# --------------------------------------------------------------------------- on the tiny model

@pytest.fixture(scope="module")
def collected(tiny_toy_root, tmp_path_factory):
    """The tiny toy project after `collect` (tiny params), copied so tests may plant things in it."""
    from conftest import TINY_PARAMS
    from sasgate.determinism import make_deterministic
    from sasgate.evalset import relock
    from sasgate.stages import collect

    root = tmp_path_factory.mktemp("collected")
    shutil.copytree(tiny_toy_root / "artifacts", root / "artifacts")
    (root / "data").mkdir()
    params = parse_params(copy.deepcopy(TINY_PARAMS))
    paths = Paths.at(root)
    relock(params, paths, "test")
    make_deterministic(params.runtime.seed, params.runtime.threads)
    collect.run(params, paths)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return root


TINY_STEER = {"steer": {"add_strengths": [0.5, 4.0], "ablate_strengths": [1.0], "seeds": [0], "max_new_tokens": 3},
              "directions": {"induce_threshold": -1e9, "kl_threshold": 1e9, "prune_layer_fraction": 0.0},
              "features": {"steer_tuple": "L1.resid_post"}, "saes": {"train": {"training_tokens": 2048,
                                                                                "batch_size": 128}}}


@pytest.fixture(scope="module")
def steerable(collected, tmp_path_factory):
    """`collected` after directions, saes and features (the rule's constants opened up: the tiny model barely
    refuses), so calibrate and steer can run."""
    from conftest import TINY_PARAMS
    from projects import merge
    from sasgate.stages import directions, features, saes

    root = tmp_path_factory.mktemp("steerable")
    shutil.copytree(collected, root, dirs_exist_ok=True)
    raw = merge(copy.deepcopy(TINY_PARAMS), TINY_STEER)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copytree(REPO / "sasgate" / "scorer_versions", Paths.at(root).scorer_versions)  # calibrate scores
    params, paths = parse_params(raw), Paths.at(root)
    for stage in (directions, saes, features):
        stage.run(params, paths)
    return root


def test_directions_builds_on_one_part_and_scores_on_the_other(steerable):
    import torch

    from sasgate import dim
    from sasgate.activations import load_post_instruction, split_items

    record = json.loads((steerable / "artifacts" / "directions" / "selection.json").read_text())
    build, validation = record["parts"]["build"], record["parts"]["validation"]
    assert not set(build["sources"]) & set(validation["sources"]) and build["items"] and validation["items"]
    assert all(i.startswith("selection/") for part in (build, validation) for i in part["items"])
    paths = Paths.at(steerable)
    items = split_items(paths, "selection")
    rows = [i for i, it in enumerate(items) if it.id in set(build["items"])]
    want = dim.mean_difference(load_post_instruction(paths, "selection")[rows],
                               torch.tensor([items[i].label == "harmful" for i in rows]))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(steerable / "artifacts" / "directions" / "directions.safetensors"))["candidates"],
                       want)
    kept = set(build["items"]) | set(validation["items"])
    assert sorted(set(it.id for it in items) - kept) == record["filter"]["dropped_items"] or not record["filter"]["applied"]


def test_both_methods_get_one_operator_at_one_hook_on_one_scale(steerable):
    """The old grid added the raw DIM vector at DIM's layer and the decoded SAS vector at the SAS hook, each
    scaled by its own norm, and 'ablated' SAS inside the SAE. Now: the same hook, the same norm, the same
    directional ablation at every residual write."""
    import torch

    from sasgate import steering
    from sasgate.modeling import load_chat_model

    params = parse_params(yaml.safe_load((steerable / "params.yaml").read_text()))
    paths = Paths.at(steerable)
    chat = load_chat_model(params, paths)
    settings = {(s.arm, s.strength): s for s in steering.build_settings(params, chat, paths, resid_norm=3.0)}
    x = torch.zeros(1, 1, chat.model.cfg.d_model)
    for s in (0.5, 4.0):
        dim_hooks, sas_hooks = settings[("dim_add", s)].hooks, settings[("sas_add", s)].hooks
        assert [h for h, _ in dim_hooks] == [h for h, _ in sas_hooks] == ["blocks.1.hook_resid_post"]
        shifts = [fn(x, None)[0, 0].norm().item() for _, fn in (dim_hooks[0], sas_hooks[0])]
        assert shifts == pytest.approx([s * 3.0, s * 3.0], rel=1e-5)
    dim_abl, sas_abl = settings[("dim_ablate", 1.0)].hooks, settings[("sas_ablate", 1.0)].hooks
    assert [h for h, _ in dim_abl] == [h for h, _ in sas_abl] and len(dim_abl) == 3 * chat.model.cfg.n_layers
    assert [h for h, _ in settings[("sas_latent_ablate", 1.0)].hooks] == ["blocks.1.hook_resid_post"]


def test_calibrate_then_steer_fix_strengths_on_selection_before_the_eval_split(steerable, tmp_path):
    from sasgate.artifacts import sha256_file
    from sasgate.stages import calibrate, score, steer

    root = tmp_path / "p"
    shutil.copytree(steerable, root)
    params, paths = parse_params(yaml.safe_load((root / "params.yaml").read_text())), Paths.at(root)
    calibrate.run(params, paths)
    st = behaviour.read_strengths(paths.calibrate_dir / behaviour.STRENGTHS_FILE)
    assert st.hook == "blocks.1.hook_resid_post" and st.resid_norm > 0 and set(st.choices) == set(ARMS)
    cal_rows = behaviour.read_rows(paths.calibrate_dir / behaviour.SCORES_FILE, behaviour.ScoreRow)
    assert {r.split for r in cal_rows} == {"selection"}
    for r in cal_rows:  # each arm generated only on the class it is judged on
        assert r.arm == BASELINE or r.label == KINDS[ARMS[r.arm].kind].judged_on
    side = json.loads((paths.calibrate_dir / behaviour.SIDE_EFFECTS_FILE).read_text())["settings"]
    for s in side:  # the budgeted figure is the KL on the text the arm should leave alone
        if s["arm"] != BASELINE:
            assert s["side_effect"] == s["kl"][behaviour.off_target(s["arm"])]
    steer.run(params, paths)
    eval_side = json.loads((paths.steer_dir / behaviour.SIDE_EFFECTS_FILE).read_text())
    assert eval_side["strengths_sha256"] == sha256_file(paths.calibrate_dir / behaviour.STRENGTHS_FILE)
    assert eval_side["resid_norm"] == st.resid_norm and all(s["perplexity"] is None or s["perplexity"] > 0
                                                            for s in eval_side["settings"])
    gen = behaviour.read_rows(paths.steer_dir / behaviour.GENERATIONS_FILE, behaviour.GenerationRow)
    assert {r.split for r in gen} == {"eval"} and {r.label for r in gen} == {"harmful", "harmless"}
    score.run(params, paths)
    assert {r.split for r in behaviour.read_rows(paths.score_dir / behaviour.SCORES_FILE, behaviour.ScoreRow)} == {"eval"}


def _plant_leak(root: Path) -> str:
    """Give one eval item the text of a selection item; returns that text."""
    items_file = root / "artifacts" / "collect" / "items.jsonl"
    items = [json.loads(line) for line in items_file.read_text().splitlines()]
    selection = next(it for it in items if it["split"] == "selection" and it["label"] == "harmful")
    target = next(it for it in items if it["split"] == "eval" and it["label"] == "harmful")
    target["text"] = selection["text"]
    items_file.write_text("".join(json.dumps(it, sort_keys=True) + "\n" for it in items))
    return selection["text"]


@pytest.mark.parametrize("stage", ["directions", "features", "calibrate", "steer"])
def test_leakage_guard_stops_every_picking_stage_before_it_picks(steerable, tmp_path, stage):
    import subprocess
    import sys

    from sasgate.errors import LeakageError

    root = tmp_path / "p"
    shutil.copytree(steerable, root)
    shutil.rmtree(root / "artifacts" / stage, ignore_errors=True)
    (root / "metrics" / f"{stage}.json").unlink(missing_ok=True)
    text = _plant_leak(root)
    res = subprocess.run([sys.executable, "-m", f"sasgate.stages.{stage}"], cwd=root, capture_output=True, text=True)
    assert res.returncode == LeakageError.exit_code, res.stderr
    assert "evaluation-set leakage" in res.stderr and repr(text)[:40] in res.stderr
    assert not (root / "artifacts" / stage).exists() and not (root / "metrics" / f"{stage}.json").exists()


def test_completion_nll_is_the_unsteered_models_own_loss(tiny_toy_dir):
    import math

    import torch

    from sasgate.modeling import toy_model_from_dir
    from sasgate.stages.steer import completion_nll

    chat = toy_model_from_dir(tiny_toy_dir)
    texts, comps = ["how do i rob the bank ?", "tell me how to visit a park ."], ["i cannot help with that .",
                                                                                  "sure ! here is how"]
    total, count = completion_nll(chat, texts, comps, batch_size=2)
    expected, n = 0.0, 0
    for text, comp in zip(texts, comps):  # one unpadded sequence at a time
        p, c = chat.prompt_ids(text), chat.codec.encode(comp)
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(chat.model(ids, return_type="logits")[0].double(), dim=-1)
        expected -= sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
        n += len(c)
    assert count == n and total == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(total / count)


def test_the_default_eval_split_has_enough_source_prompts():
    from sasgate.params import load_params

    p = load_params(REPO / "params.yaml")
    assert p.eval.n_eval >= p.validity.min_samples  # the resampling unit is the source prompt


@pytest.mark.parametrize("over, named", [
    ({"add_strengths": []}, "steer.add_strengths"), ({"ablate_strengths": []}, "steer.ablate_strengths"),
    ({"seeds": []}, "steer.seeds"), ({"add_strengths": [1.0, 1.0]}, "repeats a value"),
    ({"ablate_strengths": [1.5]}, "steer.ablate_strengths"), ({"add_strengths": [0.0]}, "steer.add_strengths"),
])
def test_the_params_schema_rejects_an_empty_or_degenerate_grid(over, named):
    """An empty grid made both arms fall back to the baseline: a vacuous 'SAS matches DIM'."""
    from sasgate.errors import ParamsError

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["steer"].update(over)
    with pytest.raises(ParamsError, match=named.replace(".", r"\.")):
        parse_params(raw)
