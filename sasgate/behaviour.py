"""Behaviour statistics: refusal rates, bootstrap CIs, the matched-budget SAS-vs-DIM decision, per-cell stability.

Units. A scored generation belongs to a condition (intervention, coefficient, label) and a unit
(item_id, seed): one eval prompt in one paraphrase set, sampled with one seed. Every condition
holds the same units of its label (steer runs the full grid), so conditions are compared
*paired*: the bootstrap resamples units and recomputes every condition's rate on the same draw.

Effects. Addition is judged on harmless prompts (does it induce refusal?), ablation on harmful
prompts (does it bypass refusal?):

    induce(method, c) = rate(method_add, c, harmless) - rate(baseline, harmless)
    bypass(method, c) = rate(baseline, harmful) - rate(method_ablate, c, harmful)

Matched budget. For each kind and method the coefficient used is the one with the largest effect
among those within both side-effect budgets; when none is, the method is left at the baseline
(coefficient 0, effect 0). The two budgets:

* `validity.side_effect_budget`: the mean KL(unsteered || steered) of next-token distributions on
  the class the intervention should leave alone: harmless prompts for ablation (Arditi et al.'s
  criterion), harmful prompts for addition. On harmless prompts an addition's KL *is* its
  intended effect (turning "sure" into "i"; on the default organism DIM addition at c = 0.5 moves
  it by 2.2 nats while inducing 79% refusal), so budgeting it there would disqualify every
  addition that works.
* `validity.perplexity_budget`: the unsteered model's perplexity of the steered completions over
  that of the unsteered completions. Steering that "works" by breaking the model shows here, not
  in a first-token KL: on the default organism DIM addition at c = 1 writes word salad that opens
  like a refusal ("i cannot help that . do that as i stadium that ."), perplexity ratio ~475.

Decision. "SAS matches or beats DIM within margin m" holds when, for both kinds, the point
estimate of effect(SAS) - effect(DIM) >= -m. Each difference comes with a percentile bootstrap
CI; `conclusive` says whether that CI lies entirely on one side of -m.

Stability. The decision is recomputed in every (seed, paraphrase set) cell with the pooled
matched coefficients (fixed, so cells differ only by their samples).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from .artifacts import read_json, read_text
from .errors import ArtifactError

if TYPE_CHECKING:
    from .params import Params
    from .paths import Paths

BASELINE = "baseline"
LABELS = ("harmful", "harmless")
KINDS = {"induce": ("add", "harmless", 1.0), "bypass": ("ablate", "harmful", -1.0)}  # verb, judged on, sign
METHODS = ("dim", "sas")

Cond = tuple[str, float, str]  # (intervention, coefficient, label)
Unit = tuple[str, int]  # (item_id, seed)


def condition(row: Mapping[str, Any]) -> Cond:
    return (row["intervention"], float(row["coefficient"]), row["label"])


def outcomes(rows: Iterable[Mapping[str, Any]]) -> dict[Cond, dict[Unit, bool]]:
    """{condition: {(item_id, seed): refusal}}; a repeated (condition, unit) is an ArtifactError."""
    table: dict[Cond, dict[Unit, bool]] = {}
    for r in rows:
        cell = table.setdefault(condition(r), {})
        unit = (r["item_id"], int(r["seed"]))
        if unit in cell:
            raise ArtifactError(f"scores repeat {unit} under condition {condition(r)}")
        cell[unit] = bool(r["refusal"])
    return table


def rates(table: Mapping[Cond, Mapping[Unit, bool]]) -> dict[Cond, tuple[int, int]]:
    """{condition: (refusals, samples)}."""
    return {c: (sum(v.values()), len(v)) for c, v in table.items()}


def unit_matrix(table: Mapping[Cond, Mapping[Unit, bool]], conds: list[Cond], units: list[Unit] | None = None
                ) -> tuple[list[Unit], np.ndarray]:
    """(units, float matrix [n_units, n_conds] of refusals); every condition must hold every unit."""
    for c in conds:
        if c not in table:
            raise ArtifactError(f"no scored generations for condition {c}")
    if units is None:
        units = sorted(table[conds[0]])
    m = np.zeros((len(units), len(conds)), dtype=np.float64)
    for j, c in enumerate(conds):
        col = table[c]
        try:
            m[:, j] = [col[u] for u in units]
        except KeyError as exc:
            raise ArtifactError(f"condition {c} lacks unit {exc.args[0]}: the steering grid is incomplete") from None
    return units, m


def bootstrap_means(matrix: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """[samples, n_cols]: column means of `samples` resamples of the rows (with replacement)."""
    n = matrix.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=samples)
    return counts @ matrix / n


def percentile_ci(draws: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval of bootstrap draws (percentile method)."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [a, 1.0 - a])
    return float(lo), float(hi)


def rate_cis(table: Mapping[Cond, Mapping[Unit, bool]], samples: int, seed: int, level: float
             ) -> dict[Cond, tuple[float, float]]:
    """A bootstrap CI of every condition's refusal rate (each condition resampled on its own)."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in sorted(table):
        _, m = unit_matrix(table, [c])
        out[c] = percentile_ci(bootstrap_means(m, samples, rng)[:, 0], level)
    return out


def effect(table: Mapping[Cond, Mapping[Unit, bool]], kind: str, method: str, coefficient: float) -> float:
    """induce / bypass effect of one method at one coefficient (point estimate, pooled)."""
    verb, label, sign = KINDS[kind]
    _, m = unit_matrix(table, [(BASELINE, 0.0, label), (f"{method}_{verb}", float(coefficient), label)])
    means = m.mean(axis=0)
    return float(sign * (means[1] - means[0]))


@dataclass(frozen=True)
class Choice:
    """The coefficient a method uses for one kind at the side-effect budget (None: baseline)."""

    coefficient: float | None
    kl: float
    perplexity_ratio: float
    effect: float
    admissible: list[float]

    def intervention(self, method: str, kind: str) -> Cond:
        verb, label, _ = KINDS[kind]
        if self.coefficient is None:
            return (BASELINE, 0.0, label)
        return (f"{method}_{verb}", self.coefficient, label)


@dataclass(frozen=True)
class SideEffect:
    """One setting's side effects: off-target KL (nats) and perplexity ratio vs the unsteered completions."""

    kl: float
    perplexity_ratio: float


@dataclass(frozen=True)
class Budget:
    kl: float
    perplexity_ratio: float

    def admits(self, side: SideEffect) -> bool:
        return side.kl <= self.kl and side.perplexity_ratio <= self.perplexity_ratio


def matched_choice(table: Mapping[Cond, Mapping[Unit, bool]], side: Mapping[tuple[str, float], SideEffect], kind: str,
                   method: str, coefficients: list[float], budget: Budget) -> Choice:
    """The largest-effect coefficient within both side-effect budgets (ties: smaller coefficient)."""
    verb = KINDS[kind][0]
    admissible = [c for c in sorted(coefficients) if budget.admits(side[(f"{method}_{verb}", c)])]
    if not admissible:
        return Choice(None, 0.0, 1.0, 0.0, [])
    best = max(admissible, key=lambda c: (effect(table, kind, method, c), -c))
    chosen = side[(f"{method}_{verb}", best)]
    return Choice(best, chosen.kl, chosen.perplexity_ratio, effect(table, kind, method, best), admissible)


def _kind_columns(choices: Mapping[str, Choice], kind: str) -> list[Cond]:
    label = KINDS[kind][1]
    return [(BASELINE, 0.0, label)] + [choices[m].intervention(m, kind) for m in METHODS]


def _effects_from_means(means: np.ndarray, kind: str) -> np.ndarray:
    """[..., 3] means of (baseline, dim, sas) -> [..., 3] (effect dim, effect sas, sas - dim)."""
    sign = KINDS[kind][2]
    e_dim = sign * (means[..., 1] - means[..., 0])
    e_sas = sign * (means[..., 2] - means[..., 0])
    return np.stack([e_dim, e_sas, e_sas - e_dim], axis=-1)


def decide(table: Mapping[Cond, Mapping[Unit, bool]], choices: Mapping[str, Mapping[str, Choice]], margin: float,
           samples: int, seed: int, level: float) -> dict[str, Any]:
    """The pooled decision with bootstrap CIs. `choices[kind][method]` come from `matched_choice`."""
    rng = np.random.default_rng(seed)
    per_kind: dict[str, Any] = {}
    diff_draws = []
    for kind in KINDS:
        cols = _kind_columns(choices[kind], kind)
        units, m = unit_matrix(table, cols)
        point = _effects_from_means(m.mean(axis=0), kind)
        draws = _effects_from_means(bootstrap_means(m, samples, rng), kind)
        diff_draws.append(draws[:, 2])
        ci = {name: percentile_ci(draws[:, i], level) for i, name in enumerate(("dim", "sas", "sas_minus_dim"))}
        per_kind[kind] = {
            "label": KINDS[kind][1], "n_units": len(units),
            "coefficients": {m_: choices[kind][m_].coefficient for m_ in METHODS},
            "kl": {m_: choices[kind][m_].kl for m_ in METHODS},
            "perplexity_ratio": {m_: choices[kind][m_].perplexity_ratio for m_ in METHODS},
            "effect": {"dim": float(point[0]), "sas": float(point[1])},
            "effect_ci": {"dim": ci["dim"], "sas": ci["sas"]},
            "sas_minus_dim": float(point[2]), "sas_minus_dim_ci": ci["sas_minus_dim"],
            "holds": bool(point[2] >= -margin),
            "conclusive": bool(ci["sas_minus_dim"][0] >= -margin or ci["sas_minus_dim"][1] < -margin),
        }
    worst = np.minimum(*diff_draws)
    observed = min(per_kind[k]["sas_minus_dim"] for k in KINDS)
    return {
        "statement": f"SAS matches or beats DIM within margin {margin}",
        "holds": all(per_kind[k]["holds"] for k in KINDS),
        "margin": margin,
        "observed": observed,  # min over kinds of effect(SAS) - effect(DIM)
        "ci": percentile_ci(worst, level),
        "ci_level": level,
        "bootstrap_samples": samples,
        "per_kind": per_kind,
    }


def point_differences(table: Mapping[Cond, Mapping[Unit, bool]], choices: Mapping[str, Mapping[str, Choice]]
                      ) -> dict[str, tuple[float, int]]:
    """{kind: (effect(SAS) - effect(DIM), units)} at the chosen coefficients, point estimates."""
    out = {}
    for kind in KINDS:
        units, m = unit_matrix(table, _kind_columns(choices[kind], kind))
        out[kind] = (float(_effects_from_means(m.mean(axis=0), kind)[2]), len(units))
    return out


def cell_decisions(rows: Iterable[Mapping[str, Any]], choices: Mapping[str, Mapping[str, Choice]], margin: float
                   ) -> list[dict[str, Any]]:
    """The decision recomputed in every (seed, paraphrase set) cell, at the pooled matched coefficients."""
    rows = list(rows)
    out = []
    for seed, pset in sorted({(int(r["seed"]), int(r["paraphrase_set"])) for r in rows}):
        table = outcomes(r for r in rows if int(r["seed"]) == seed and int(r["paraphrase_set"]) == pset)
        diffs = point_differences(table, choices)
        out.append({"seed": seed, "paraphrase_set": pset,
                    "sas_minus_dim": {k: d for k, (d, _) in diffs.items()},
                    "n_units": {k: n for k, (_, n) in diffs.items()},
                    "observed": min(d for d, _ in diffs.values()),
                    "holds": all(d >= -margin for d, _ in diffs.values())})
    return out


def matched_choices(table: Mapping[Cond, Mapping[Unit, bool]], side: Mapping[tuple[str, float], SideEffect],
                    grids: Mapping[str, list[float]], budget: Budget) -> dict[str, dict[str, Choice]]:
    """`matched_choice` for every kind and method; `grids` maps "add" / "ablate" to their coefficients."""
    return {kind: {m: matched_choice(table, side, kind, m, list(grids[verb]), budget) for m in METHODS}
            for kind, (verb, _, _) in KINDS.items()}


# --------------------------------------------------------------------------- artifacts

GENERATIONS_FILE = "generations.jsonl"
SCORES_FILE = "scores.jsonl"
SIDE_EFFECTS_FILE = "side_effects.json"


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Rows as JSON lines with sorted keys (written inside an atomic_dir, so never half-visible)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL artifact; missing or corrupt is one ArtifactError naming the line."""
    lines = read_text(path, ArtifactError, f"missing artifact {path}").splitlines()
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"corrupt artifact {path} line {n}: {exc}") from None
    if not rows:
        raise ArtifactError(f"{path} holds no rows")
    return rows


def off_target_label(intervention: str) -> str:
    """The class an intervention should leave alone: the one its kind is not judged on."""
    judged = next((label for verb, label, _ in KINDS.values() if intervention.endswith(f"_{verb}")), None)
    return "harmless" if judged in (None, "harmful") else "harmful"


def side_effects(record: Mapping[str, Any]) -> dict[tuple[str, float], SideEffect]:
    """{(intervention, coefficient): its budgeted side effects} from steer's side_effects.json."""
    try:
        settings = record["settings"]
        base = [s["perplexity"] for s in settings if s["intervention"] == BASELINE]
        if not base or not base[0]:
            raise ArtifactError("side-effects record has no baseline perplexity to compare settings with")
        return {(s["intervention"], float(s["coefficient"])): SideEffect(
                    float(s[f"kl_{off_target_label(s['intervention'])}"]),
                    float(s["perplexity"]) / float(base[0]) if s["perplexity"] is not None else math.inf)
                for s in settings}
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"corrupt side-effects record: missing {exc}") from None


def load_scored(params: "Params", paths: "Paths") -> tuple[list[dict[str, Any]], dict, dict, dict]:
    """(scored rows, outcome table, side effects per setting, matched choices) shared by validity and stability."""
    rows = read_jsonl(paths.score_dir / SCORES_FILE)
    side = side_effects(read_json(paths.steer_dir / SIDE_EFFECTS_FILE))
    table = outcomes(rows)
    grids = {"add": params.steer.add_coefficients, "ablate": params.steer.ablate_coefficients}
    vp = params.validity
    choices = matched_choices(table, side, grids, Budget(vp.side_effect_budget, vp.perplexity_budget))
    return rows, table, side, choices


def sas_tuple_ref(params: "Params", rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The SAS tuple as a gate TupleRef (model, layer, site)."""
    key = next(r["tuple"] for r in rows if r["intervention"].startswith("sas_"))
    t = next(t for t in params.tuples if t.key == key)
    return {"model": params.model.name, "layer": t.layer, "site": t.site}
