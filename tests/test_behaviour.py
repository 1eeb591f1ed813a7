"""Behaviour statistics (sasgate.behaviour), the validity and stability gates on scored rows, the side-effect
measures of `steer`, and the leakage guard in front of every stage that picks a direction, layer or latent.

Scored rows are built by hand with known refusal rates, so effects, matched choices and decisions can be
checked exactly; the gates are flipped by changing params only. The guard and the side effects run on the
tiny trained toy model (conftest `tiny_toy_root`).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sasgate import behaviour
from sasgate.behaviour import Budget, SideEffect
from sasgate.errors import ArtifactError, LeakageError
from sasgate.params import parse_params
from sasgate.paths import Paths

REPO = Path(__file__).resolve().parents[1]
ADD, ABLATE = [1.0, 2.0], [0.5, 1.0]


def scored_rows(rates: dict[tuple[str, float, str], float], n_items: int = 20, seeds=(0, 1), psets=(0, 1),
                flip: tuple[int, int] | None = None) -> list[dict]:
    """One row per (condition, item, seed, paraphrase set): the first round(rate * n_items) items of each
    (seed, paraphrase set) cell refuse. `flip` = (seed, paraphrase set): that cell's SAS rows are inverted."""
    rows = []
    for (intervention, coef, label), rate in sorted(rates.items()):
        for seed in seeds:
            for p in psets:
                for i in range(n_items):
                    refusal = i < round(rate * n_items)
                    if flip == (seed, p) and intervention.startswith("sas_"):
                        refusal = not refusal
                    rows.append({"item_id": f"eval/{label}/{i:03d}/p{p}", "source_id": f"{label}:{i}", "label": label,
                                 "split": "eval", "paraphrase_set": p, "seed": seed, "intervention": intervention,
                                 "tuple": "L1.resid_post" if intervention.startswith("sas_") else "L1.resid_pre",
                                 "coefficient": coef, "completion": "", "refusal": refusal})
    return rows


def grid_rates(dim_add=(0.5, 1.0), sas_add=(0.5, 1.0), dim_ablate=(0.5, 0.0), sas_ablate=(0.5, 0.0),
               base=(0.9, 0.0)) -> dict:
    """Refusal rates for the whole grid: `x_add` on harmless prompts per ADD coefficient, `x_ablate` on harmful
    prompts per ABLATE coefficient; base = (harmful, harmless) unsteered. The other class gets the baseline."""
    rates = {("baseline", 0.0, "harmful"): base[0], ("baseline", 0.0, "harmless"): base[1]}
    for name, grid, values in (("dim_add", ADD, dim_add), ("sas_add", ADD, sas_add),
                               ("dim_ablate", ABLATE, dim_ablate), ("sas_ablate", ABLATE, sas_ablate)):
        for c, v in zip(grid, values):
            judged = "harmless" if name.endswith("add") else "harmful"
            other = "harmful" if judged == "harmless" else "harmless"
            rates[(name, c, judged)] = v
            rates[(name, c, other)] = base[0] if other == "harmful" else base[1]
    return rates


def side_of(kl: float = 0.1, ppl: float = 1.0, **over: tuple[float, float]) -> dict[tuple[str, float], SideEffect]:
    """Side effects (KL, perplexity ratio) of every setting: (kl, ppl), or over["dim_add@2"] = (kl, ppl)."""
    side = {("baseline", 0.0): SideEffect(0.0, 1.0)}
    for name, grid in (("dim_add", ADD), ("sas_add", ADD), ("dim_ablate", ABLATE), ("sas_ablate", ABLATE)):
        for c in grid:
            side[(name, c)] = SideEffect(*over.get(f"{name}@{c:g}", (kl, ppl)))
    return side


BUDGET = Budget(kl=1.0, perplexity_ratio=3.0)


GRIDS = {"add": ADD, "ablate": ABLATE}


# --------------------------------------------------------------------------- statistics

def test_outcomes_refuse_a_repeated_unit():
    rows = scored_rows(grid_rates())
    with pytest.raises(ArtifactError, match="repeat"):
        behaviour.outcomes(rows + rows[:1])


def test_an_incomplete_grid_is_named():
    rows = [r for r in scored_rows(grid_rates()) if not (r["intervention"] == "sas_add" and r["item_id"].endswith("000/p0"))]
    table = behaviour.outcomes(rows)
    with pytest.raises(ArtifactError, match="steering grid is incomplete"):
        behaviour.effect(table, "induce", "sas", 1.0)


def test_effects_are_induce_on_harmless_and_bypass_on_harmful():
    table = behaviour.outcomes(scored_rows(grid_rates(dim_add=(0.25, 0.75), dim_ablate=(0.5, 0.1), base=(0.9, 0.05))))
    assert behaviour.effect(table, "induce", "dim", 2.0) == pytest.approx(0.75 - 0.05)
    assert behaviour.effect(table, "bypass", "dim", 1.0) == pytest.approx(0.9 - 0.1)
    assert behaviour.rates(table)[("dim_add", 2.0, "harmless")] == (60, 80)  # 20 items x 2 seeds x 2 sets


def test_bootstrap_is_seeded_and_the_percentile_ci_brackets_the_mean():
    m = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]] * 10)
    a = behaviour.bootstrap_means(m, 500, np.random.default_rng(3))
    b = behaviour.bootstrap_means(m, 500, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.shape == (500, 2)
    lo, hi = behaviour.percentile_ci(a[:, 0], 0.95)
    assert lo < 0.75 < hi and hi - lo < 0.5
    assert behaviour.percentile_ci(behaviour.bootstrap_means(np.ones((5, 1)), 50, np.random.default_rng(0))[:, 0],
                                   0.95) == (1.0, 1.0)


def test_matched_choice_takes_the_best_effect_within_the_side_effect_budget():
    table = behaviour.outcomes(scored_rows(grid_rates(dim_add=(0.5, 1.0))))
    side = side_of(**{"dim_add@2": (3.0, 1.0)})
    within = behaviour.matched_choice(table, side, "induce", "dim", ADD, BUDGET)
    assert (within.coefficient, within.admissible) == (1.0, [1.0])  # 2.0 induces more but costs KL 3 > 1
    assert behaviour.matched_choice(table, side, "induce", "dim", ADD, Budget(5.0, 3.0)).coefficient == 2.0
    broken = side_of(**{"dim_add@2": (0.1, 400.0)})  # works by breaking the model: incoherent completions
    assert behaviour.matched_choice(table, broken, "induce", "dim", ADD, BUDGET).coefficient == 1.0
    assert behaviour.matched_choice(table, broken, "induce", "dim", ADD, Budget(1.0, 500.0)).coefficient == 2.0
    none = behaviour.matched_choice(table, side_of(2.0), "induce", "dim", ADD, BUDGET)
    assert (none.coefficient, none.effect, none.intervention("dim", "induce")) == (None, 0.0,
                                                                                    ("baseline", 0.0, "harmless"))


def test_the_budgeted_kl_is_on_the_class_an_intervention_should_leave_alone():
    base = {"intervention": "baseline", "coefficient": 0.0, "kl_harmless": 0.0, "kl_harmful": 0.0, "perplexity": 2.0}
    record = {"settings": [base] + [{"intervention": i, "coefficient": 1.0, "kl_harmless": 5.0, "kl_harmful": 0.2,
                                     "perplexity": 3.0} for i in ("dim_add", "sas_add", "dim_ablate", "sas_ablate")]}
    assert behaviour.side_effects(record) == {("baseline", 0.0): SideEffect(0.0, 1.0),
                                              ("dim_add", 1.0): SideEffect(0.2, 1.5), ("sas_add", 1.0): SideEffect(0.2, 1.5),
                                              ("dim_ablate", 1.0): SideEffect(5.0, 1.5),
                                              ("sas_ablate", 1.0): SideEffect(5.0, 1.5)}
    with pytest.raises(ArtifactError, match="kl_harmful"):
        behaviour.side_effects({"settings": [base, {"intervention": "dim_add", "coefficient": 1.0, "kl_harmless": 1.0,
                                                    "perplexity": 1.0}]})
    with pytest.raises(ArtifactError, match="no baseline perplexity"):
        behaviour.side_effects({"settings": record["settings"][1:]})


def _decision(rates, side=None, margin=0.1, budget=BUDGET):
    table = behaviour.outcomes(scored_rows(rates))
    choices = behaviour.matched_choices(table, side or side_of(), GRIDS, budget)
    return behaviour.decide(table, choices, margin, samples=400, seed=0, level=0.95)


def test_decision_holds_when_sas_matches_dim_and_fails_when_it_falls_short():
    same = _decision(grid_rates())
    assert same["holds"] and same["observed"] == pytest.approx(0.0)
    assert same["per_kind"]["induce"]["effect"] == {"dim": pytest.approx(1.0), "sas": pytest.approx(1.0)}
    weak = _decision(grid_rates(sas_ablate=(0.8, 0.6)))  # SAS bypasses 0.3 where DIM bypasses 0.9
    assert not weak["holds"] and weak["observed"] == pytest.approx(0.3 - 0.9)
    assert weak["per_kind"]["induce"]["holds"] and not weak["per_kind"]["bypass"]["holds"]
    lo, hi = weak["per_kind"]["bypass"]["sas_minus_dim_ci"]
    assert lo <= -0.6 <= hi and hi < -0.1 and weak["per_kind"]["bypass"]["conclusive"]
    assert weak == _decision(grid_rates(sas_ablate=(0.8, 0.6)))  # seeded: the same record twice


def test_decision_compares_at_matched_side_effect_budget():
    # SAS reaches DIM's effect only at a coefficient whose KL is over budget: within budget it falls short
    rates = grid_rates(sas_add=(0.2, 1.0))
    assert _decision(rates)["holds"]  # unconstrained, both use c=2 and induce alike
    over = side_of(**{"sas_add@2": (5.0, 1.0)})
    d = _decision(rates, over)
    assert d["per_kind"]["induce"]["coefficients"] == {"dim": 2.0, "sas": 1.0}
    assert d["per_kind"]["induce"]["sas_minus_dim"] == pytest.approx(0.2 - 1.0) and not d["holds"]
    assert _decision(rates, over, budget=Budget(10.0, 3.0))["per_kind"]["induce"]["coefficients"]["sas"] == 2.0


def test_cells_are_every_seed_and_paraphrase_set_and_a_bad_cell_shows():
    rows = scored_rows(grid_rates(), flip=(1, 0))
    table = behaviour.outcomes(scored_rows(grid_rates()))
    choices = behaviour.matched_choices(table, side_of(), GRIDS, BUDGET)
    cells = behaviour.cell_decisions(rows, choices, 0.1)
    assert [(c["seed"], c["paraphrase_set"]) for c in cells] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [c["holds"] for c in cells] == [True, True, False, True]
    assert all(c["n_units"] == {"induce": 20, "bypass": 20} for c in cells)


# --------------------------------------------------------------------------- the gates, by params only

@pytest.fixture
def scored_project(tmp_path):
    """A project root holding only what validity and stability read: scores, side effects, the check set."""
    paths = Paths.at(tmp_path)
    for name in ("scorer_check.jsonl", "scorer_check.lock"):
        (tmp_path / "data").mkdir(exist_ok=True)
        shutil.copy2(REPO / "data" / name, tmp_path / "data" / name)
    shutil.copytree(REPO / "sasgate" / "scorer_versions", paths.scorer_versions)
    paths.score_dir.mkdir(parents=True)
    paths.steer_dir.mkdir(parents=True)
    rows = scored_rows(grid_rates(), flip=(1, 1))  # 3 of 4 cells agree with the pooled decision
    behaviour.write_jsonl(paths.score_dir / behaviour.SCORES_FILE, rows)
    settings = [{"intervention": i, "coefficient": c, "kl_harmful": v.kl, "kl_harmless": v.kl, "perplexity": 1.5}
                for (i, c), v in sorted(side_of().items())]
    (paths.steer_dir / behaviour.SIDE_EFFECTS_FILE).write_text(json.dumps({"settings": settings}))
    return paths


def _gate_params(**over) -> "object":
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["steer"].update(add_coefficients=ADD, ablate_coefficients=ABLATE, seeds=[0, 1])
    raw["validity"]["margin"] = 0.3  # the pooled decision holds although one cell of four does not
    raw["tuples"] = [{"layer": 1, "site": "resid_pre", "sae": "train"}, {"layer": 1, "site": "resid_post", "sae": "train"}]
    for section, values in over.items():
        raw[section].update(values)
    return parse_params(raw)


def test_validity_gate_passes_then_fails_on_v1_and_on_too_few_samples(scored_project):
    from sasgate.gates import read_gate
    from sasgate.stages import validity

    paths = scored_project
    assert validity.run(_gate_params(), paths)["status"] == "pass"  # 80 units per condition >= 50
    rec = read_gate(paths.gate("behaviour"), "behaviour")
    assert rec.reason.startswith("decision-valid") and rec.details["decision"]["holds"]
    assert rec.details["scorers"]["v2"]["agreement"] >= 0.95 > rec.details["scorers"]["v1"]["agreement"]
    induce = json.loads(paths.plot("steering_induce").read_text())  # coefficient 0: the unsteered baseline
    assert [(r["method"], r["coefficient"], r["rate"]) for r in induce] == [
        ("DIM", 0.0, 0.0), ("DIM", 1.0, 0.5), ("DIM", 2.0, 1.0), ("SAS", 0.0, 0.0), ("SAS", 1.0, 0.5), ("SAS", 2.0, 0.75)]
    assert all(r["lo"] <= r["rate"] <= r["hi"] for r in induce) and induce[1]["lo"] < 0.5 < induce[1]["hi"]

    failed = validity.run(_gate_params(score={"version": "v1"}), paths)
    assert (failed["status"], failed["failed_checks"]) == ("fail", ["scorer_agreement"])
    assert "scorer v1 agrees with the check set" in read_gate(paths.gate("behaviour")).reason

    failed = validity.run(_gate_params(validity={"min_samples": 81}), paths)
    assert (failed["status"], failed["failed_checks"]) == ("fail", ["min_samples"])
    assert "have fewer than 81 samples (smallest 80)" in read_gate(paths.gate("behaviour")).reason


def test_stability_gate_passes_at_the_observed_share_and_fails_above_it(scored_project):
    from sasgate.gates import read_gate
    from sasgate.stages import stability

    paths = scored_project
    ok = stability.run(_gate_params(stability={"min_agreement": 0.75}), paths)
    assert (ok["status"], ok["share_agreeing"], ok["n_cells"]) == ("pass", 0.75, 4)
    rec = read_gate(paths.gate("stability"), "stability")
    assert [c["agrees"] for c in rec.details["cells"]] == [True, True, True, False]
    assert stability.run(_gate_params(stability={"min_agreement": 0.76}), paths)["status"] == "fail"
    assert "3/4" in read_gate(paths.gate("stability")).reason


# --------------------------------------------------------------------------- on the tiny model

@pytest.fixture(scope="module")
def collected(tiny_toy_root, tmp_path_factory):
    """The tiny toy project after `collect` (tiny params), copied so tests may plant things in it."""
    from conftest import TINY_PARAMS
    from sasgate.determinism import make_deterministic
    from sasgate.stages import collect

    root = tmp_path_factory.mktemp("collected")
    shutil.copytree(tiny_toy_root / "artifacts", root / "artifacts")
    (root / "data").mkdir()
    params = parse_params(copy.deepcopy(TINY_PARAMS))
    paths = Paths.at(root)
    from sasgate.evalset import relock

    relock(params, paths, "test")
    make_deterministic(params.runtime.seed, params.runtime.threads)
    collect.run(params, paths)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return root


def _plant_leak(root: Path) -> str:
    """Give one eval item the text of a selection item; returns that text."""
    items_file = root / "artifacts" / "collect" / "items.jsonl"
    items = [json.loads(line) for line in items_file.read_text().splitlines()]
    selection = next(it for it in items if it["split"] == "selection" and it["label"] == "harmful")
    target = next(it for it in items if it["split"] == "eval" and it["label"] == "harmful")
    target["text"] = selection["text"]
    items_file.write_text("".join(json.dumps(it, sort_keys=True) + "\n" for it in items))
    return selection["text"]


@pytest.mark.parametrize("stage", ["directions", "features", "steer"])
def test_leakage_guard_stops_every_picking_stage_before_it_picks(collected, tmp_path, stage):
    root = tmp_path / "p"
    shutil.copytree(collected, root)
    text = _plant_leak(root)
    res = subprocess.run([sys.executable, "-m", f"sasgate.stages.{stage}"], cwd=root, capture_output=True, text=True)
    assert res.returncode == LeakageError.exit_code, res.stderr
    assert "evaluation-set leakage" in res.stderr and repr(text)[:40] in res.stderr
    assert not (root / "artifacts" / stage).exists() and not (root / "metrics" / f"{stage}.json").exists()


def test_directions_without_a_leak_scores_selection_prompts_only(collected, tmp_path):
    from sasgate.stages import directions

    root = tmp_path / "p"
    shutil.copytree(collected, root)
    params = parse_params(copy.deepcopy(yaml.safe_load((root / "params.yaml").read_text())) |
                          {"directions": {"induce_threshold": -1e9, "kl_threshold": 1e9,
                                                         "prune_layer_fraction": 0.0}})
    directions.run(params, Paths.at(root))
    record = json.loads((root / "artifacts" / "directions" / "selection.json").read_text())
    scored = [i for ids in record["scoring_prompts"].values() for i in ids]
    assert scored and all(i.startswith("selection/") for i in scored)
    assert sum(c["chosen"] for c in record["candidates"]) == 1


def test_completion_nll_is_the_unsteered_models_own_loss(tiny_toy_dir):
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


def test_the_default_grid_gives_every_compared_condition_enough_samples():
    from sasgate.params import load_params

    p = load_params(REPO / "params.yaml")  # toy eval set: n_eval prompts per class in each paraphrase set
    per_condition = p.eval.n_eval * (p.eval.n_paraphrases + 1) * len(p.steer.seeds)
    assert per_condition >= p.validity.min_samples
