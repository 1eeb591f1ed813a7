"""Behaviour statistics: like-for-like arms, per-source refusal rates, the cluster bootstrap, the three-valued outcome.

ARCHITECTURE.md, "The behaviour gate", is the contract; this module is its arithmetic.

Arms. Every steered condition is an arm at a strength: DIM and SAS under the same operator.

* `addition` (induce: judged on harmless prompts): s * (mean residual norm at the compared hook) * unit
  direction added at one hook, the same hook and the same strength scale for both methods;
* `directional_ablation` (bypass: judged on harmful prompts): a fraction c of the unit direction
  projected out of every residual-stream write, for the DIM direction and the SAS decoded direction;
* `latent_ablation` (SAS only): the selected latents scaled by (1 - c) inside the SAE, error term kept.
  Reported on its own, never compared with DIM's directional ablation (another operator).

Units. A scored generation belongs to a condition (arm, strength, label) and is one (source prompt,
paraphrase set, seed). The resampling unit is the **source prompt**: its paraphrases and seeds move
together (a cluster bootstrap), so `n_units` counts sources, never generations.

Effects, per source then averaged: induce = rate(arm) - rate(baseline) on harmless prompts, bypass =
rate(baseline) - rate(arm) on harmful prompts. A comparison's estimate is effect(SAS) - effect(DIM) at
each method's strength chosen on the selection split; its outcome is three-valued: `holds` when the
CI's lower bound >= -margin, `fails` when its upper bound < -margin, else `inconclusive`. Overall:
`fails` if any comparison fails, `holds` if all hold, else `inconclusive`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from .artifacts import read_json, read_text
from .errors import ArtifactError
from .validation import describe_validation

if TYPE_CHECKING:
    from .params import Params
    from .paths import Paths

BASELINE = "baseline"
LABELS = ("harmful", "harmless")
METHODS = ("dim", "sas")
Outcome = Literal["holds", "fails", "inconclusive"]
OUTCOMES = ("holds", "fails", "inconclusive")
RESAMPLING_UNIT = "source_prompt"


@dataclass(frozen=True)
class Kind:
    judged_on: str  # the class whose refusal the effect is measured on
    sign: float  # effect = sign * (rate(arm) - rate(baseline))

    @property
    def off_target(self) -> str:
        """The class an intervention of this kind should leave alone."""
        return "harmful" if self.judged_on == "harmless" else "harmless"


KINDS: dict[str, Kind] = {"induce": Kind("harmless", 1.0), "bypass": Kind("harmful", -1.0)}


@dataclass(frozen=True)
class Arm:
    method: str
    operator: str
    kind: str


ARMS: dict[str, Arm] = {
    "dim_add": Arm("dim", "addition", "induce"),
    "sas_add": Arm("sas", "addition", "induce"),
    "dim_ablate": Arm("dim", "directional_ablation", "bypass"),
    "sas_ablate": Arm("sas", "directional_ablation", "bypass"),
    "sas_latent_ablate": Arm("sas", "latent_ablation", "bypass"),
}
COMPARED = (("induce", "addition"), ("bypass", "directional_ablation"))  # (kind, operator), DIM vs SAS
REPORTED_ONLY = ("sas_latent_ablate",)  # latent-level SAS: its own arm, never compared with DIM


def arm_name(method: str, operator: str) -> str:
    return next(n for n, a in ARMS.items() if a.method == method and a.operator == operator)


def off_target(arm: str) -> str:
    return KINDS[ARMS[arm].kind].off_target


Cond = tuple[str, float, str]  # (arm, strength, label); the baseline is (BASELINE, 0.0, label)
Unit = tuple[str, int, int]  # (source_id, paraphrase_set, seed)


# --------------------------------------------------------------------------- typed rows

class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GenerationRow(_Row):
    """One steered (or baseline) generation, as `calibrate` and `steer` write it."""

    item_id: str = Field(min_length=1)
    source_id: str = Field(min_length=1)
    label: Literal["harmful", "harmless"]
    split: Literal["selection", "eval"]
    paraphrase_set: int = Field(ge=0)
    seed: int = Field(ge=0)
    arm: str
    strength: float = Field(ge=0, allow_inf_nan=False)
    tuple: str | None
    do_sample: StrictBool
    temperature: float = Field(gt=0, allow_inf_nan=False)
    completion: str

    @field_validator("arm")
    @classmethod
    def _known_arm(cls, v: str) -> str:
        if v != BASELINE and v not in ARMS:
            raise ValueError(f"unknown arm {v!r} (known: {BASELINE}, {', '.join(ARMS)})")
        return v


class ScoreRow(GenerationRow):
    """A generation with its refusal verdict and the scorer version that gave it."""

    refusal: StrictBool
    scorer_version: str = Field(min_length=1)
    scorer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Rows as JSON lines with sorted keys (written inside an atomic_dir, so never half-visible)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(dict(row), sort_keys=True, ensure_ascii=False) + "\n")


def read_rows(path: Path, model: type[_Row]) -> list[Any]:
    """Typed rows of a JSONL artifact; missing, empty, corrupt or mistyped is one ArtifactError naming line and field."""
    lines = read_text(path, ArtifactError, f"missing artifact {path}").splitlines()
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            rows.append(model.model_validate_json(line))
        except ValidationError as exc:
            raise ArtifactError(f"{path} line {n}: {describe_validation(exc)}") from None
    if not rows:
        raise ArtifactError(f"{path} holds no rows")
    return rows


Label = Literal["harmful", "harmless"]


class SideEffect(_Row):
    """One setting's side effects on each class's text (sasgate.steering), and the budgeted off-target figure."""

    arm: str
    strength: float = Field(ge=0, allow_inf_nan=False)
    tuple: str | None
    kl: dict[Label, float]
    ce_delta: dict[Label, float]
    off_target: Label | None = None  # None only for the baseline
    side_effect: float | None = None  # kl[off_target], the figure the budget reads
    perplexity: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # eval split: steered completions
    completion_tokens: int | None = Field(default=None, ge=0)

    @field_validator("kl", "ce_delta")
    @classmethod
    def _both_finite(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != set(LABELS) or not all(math.isfinite(x) for x in v.values()):
            raise ValueError(f"must hold a finite figure for each of {list(LABELS)}, got {v}")
        return v

    @model_validator(mode="after")
    def _off_target(self) -> "SideEffect":
        if self.arm == BASELINE:
            if self.off_target is not None or self.side_effect is not None:
                raise ValueError("the baseline has no off-target side effect")
            return self
        if self.arm not in ARMS:
            raise ValueError(f"unknown arm {self.arm!r}")
        if self.off_target != off_target(self.arm) or self.side_effect != self.kl[off_target(self.arm)]:
            raise ValueError(f"{self.arm}: the side effect is the KL on {off_target(self.arm)} text")
        return self


class SideEffects(_Row):
    """side_effects.json of `calibrate` (selection split) and `steer` (eval split)."""

    split: Literal["selection", "eval"]
    measure: str = Field(min_length=1)
    perplexity: str | None = None
    strengths_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # eval: the choice it came after
    hook: str | None = None
    resid_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    n_prompts: dict[Label, int]
    n_tokens: dict[Label, int]
    settings: list[SideEffect] = Field(min_length=1)

    def budgeted(self) -> dict[tuple[str, float], float]:
        """{(arm, strength): the off-target side effect} of every steered setting."""
        return {(s.arm, s.strength): s.side_effect for s in self.settings if s.side_effect is not None}


def read_side_effects(path: Path) -> SideEffects:
    try:
        return SideEffects.model_validate(read_json(path))
    except ValidationError as exc:
        raise ArtifactError(f"{path}: {describe_validation(exc)}") from None


# --------------------------------------------------------------------------- tables

def outcomes(rows: Iterable[ScoreRow]) -> dict[Cond, dict[Unit, bool]]:
    """{condition: {(source_id, paraphrase_set, seed): refusal}}; a repeated (condition, unit) is an ArtifactError."""
    table: dict[Cond, dict[Unit, bool]] = {}
    for r in rows:
        cond = (r.arm, float(r.strength), r.label)
        cell = table.setdefault(cond, {})
        unit = (r.source_id, r.paraphrase_set, r.seed)
        if unit in cell:
            raise ArtifactError(f"scores repeat {unit} under condition {cond}")
        cell[unit] = r.refusal
    return table


def rates(table: Mapping[Cond, Mapping[Unit, bool]]) -> dict[Cond, tuple[int, int]]:
    """{condition: (refusals, generations)}."""
    return {c: (sum(v.values()), len(v)) for c, v in table.items()}


def source_matrix(table: Mapping[Cond, Mapping[Unit, bool]], conds: Sequence[Cond]
                  ) -> tuple[list[str], np.ndarray]:
    """(source ids, [n_sources, n_conds] per-source refusal rates): each source's generations (paraphrase
    sets x seeds) averaged. Every condition must hold exactly the same units (the grid is complete)."""
    for c in conds:
        if c not in table or not table[c]:
            raise ArtifactError(f"no scored generations for condition {c}")
    units = sorted(table[conds[0]])
    for c in conds[1:]:
        if sorted(table[c]) != units:
            missing = sorted(set(units) ^ set(table[c]))[:3]
            raise ArtifactError(f"conditions {conds[0]} and {c} hold different units (e.g. {missing}): the "
                                "steering grid is incomplete")
    sources = sorted({u[0] for u in units})
    index = {s: i for i, s in enumerate(sources)}
    sums = np.zeros((len(sources), len(conds)))
    counts = np.zeros(len(sources))
    for u in units:
        counts[index[u[0]]] += 1
    for j, c in enumerate(conds):
        col = table[c]
        for u in units:
            sums[index[u[0]], j] += float(col[u])
    return sources, sums / counts[:, None]


def bootstrap_means(matrix: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """[samples, n_cols]: column means of `samples` resamples of the rows (sources) with replacement."""
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


def three_valued(ci: tuple[float, float], margin: float) -> Outcome:
    """The one margin rule: holds when lo >= -m, fails when hi < -m, else inconclusive."""
    lo, hi = ci
    if lo >= -margin:
        return "holds"
    if hi < -margin:
        return "fails"
    return "inconclusive"


def overall(outcomes_: Sequence[str]) -> Outcome:
    """fails if any comparison fails, holds if all hold (and there is at least one), else inconclusive."""
    if not outcomes_:
        return "inconclusive"
    if "fails" in outcomes_:
        return "fails"
    return "holds" if all(o == "holds" for o in outcomes_) else "inconclusive"


def effect_columns(means: np.ndarray, kind: str) -> np.ndarray:
    """[..., 1 + k] means of (baseline, arm_1..arm_k) -> [..., k] effects of each arm."""
    return KINDS[kind].sign * (means[..., 1:] - means[..., :1])


def effects_by_strength(table: Mapping[Cond, Mapping[Unit, bool]], arm: str, strengths: Sequence[float]
                        ) -> tuple[dict[float, float], int]:
    """({strength: point effect}, number of source prompts) of one arm over its grid, against the baseline."""
    label = KINDS[ARMS[arm].kind].judged_on
    conds = [(BASELINE, 0.0, label)] + [(arm, float(s), label) for s in strengths]
    sources, m = source_matrix(table, conds)
    eff = effect_columns(m.mean(axis=0), ARMS[arm].kind)
    return {float(s): float(e) for s, e in zip(strengths, eff)}, len(sources)


# --------------------------------------------------------------------------- choosing strengths (selection split)

class StrengthPoint(_Row):
    strength: float
    effect: float
    side_effect: float  # mean per-token KL on off-target text, nats
    admissible: StrictBool


class StrengthChoice(_Row):
    """One arm's strength, chosen on the selection split with the figures it was chosen on."""

    arm: str
    kind: str
    operator: str
    method: str
    chosen_on: Literal["selection"] = "selection"
    n_units: int = Field(ge=1)
    budget: float
    grid: list[StrengthPoint] = Field(min_length=1)
    strength: float | None  # None: no strength of the grid is within the side-effect budget
    effect: float | None
    side_effect: float | None
    reason: str


def choose_strength(arm: str, effects: Mapping[float, float], side: Mapping[float, float], n_units: int,
                    budget: float) -> StrengthChoice:
    """The largest-effect strength whose off-target side effect is within the budget (ties: the smaller strength)."""
    a = ARMS[arm]
    grid = [StrengthPoint(strength=s, effect=effects[s], side_effect=side[s], admissible=side[s] <= budget)
            for s in sorted(effects)]
    admissible = [p for p in grid if p.admissible]
    if not admissible:
        low = min(grid, key=lambda p: p.side_effect)
        return StrengthChoice(arm=arm, kind=a.kind, operator=a.operator, method=a.method, n_units=n_units,
                              budget=budget, grid=grid, strength=None, effect=None, side_effect=None,
                              reason=f"no strength within the side-effect budget {budget:g} (smallest side effect "
                                     f"{low.side_effect:.4g} at strength {low.strength:g})")
    best = max(admissible, key=lambda p: (p.effect, -p.strength))
    return StrengthChoice(arm=arm, kind=a.kind, operator=a.operator, method=a.method, n_units=n_units,
                          budget=budget, grid=grid, strength=best.strength, effect=best.effect,
                          side_effect=best.side_effect,
                          reason=f"largest selection-split effect ({best.effect:+.3f}) among the "
                                 f"{len(admissible)}/{len(grid)} strengths within the side-effect budget {budget:g}")


class Strengths(_Row):
    """artifacts/calibrate/strengths.json: every arm's chosen strength, fixed before the eval split is scored."""

    schema_: Literal["sasgate.strengths/1"] = Field(alias="schema")
    hook: str  # the hook additions act at, for both methods
    resid_norm: float = Field(gt=0, allow_inf_nan=False)  # mean residual norm there (selection split): the scale
    side_effect_measure: str
    choices: dict[str, StrengthChoice]

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @field_validator("choices")
    @classmethod
    def _every_arm(cls, v: dict[str, StrengthChoice]) -> dict[str, StrengthChoice]:
        if set(v) != set(ARMS):
            raise ValueError(f"must choose for every arm {sorted(ARMS)}, got {sorted(v)}")
        return v


STRENGTHS_SCHEMA = "sasgate.strengths/1"
STRENGTHS_FILE = "strengths.json"


def read_strengths(path: Path) -> Strengths:
    raw = read_json(path)
    try:
        return Strengths.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{path}: {describe_validation(exc)}") from None


# --------------------------------------------------------------------------- comparing on the eval split

def _arm_cond(choice: StrengthChoice, label: str) -> Cond:
    if choice.strength is None:
        return (BASELINE, 0.0, label)
    return (choice.arm, choice.strength, label)


def compare(table: Mapping[Cond, Mapping[Unit, bool]], strengths: Strengths, kind: str, operator: str,
            margin: float, samples: int, seed: int, level: float) -> dict[str, Any]:
    """One (kind, operator) comparison of SAS with DIM on the eval split, at the strengths chosen on selection.

    An arm with no admissible strength is left at the baseline (effect 0) and the comparison says so:
    no SAS strength within budget is `fails` (SAS does not steer where DIM does); no DIM strength is
    `inconclusive` (there is no reference to match), and the gate's `admissible` check fails."""
    label = KINDS[kind].judged_on
    dim = strengths.choices[arm_name("dim", operator)]
    sas = strengths.choices[arm_name("sas", operator)]
    cols = [(BASELINE, 0.0, label), _arm_cond(dim, label), _arm_cond(sas, label)]
    sources, m = source_matrix(table, cols)
    point = effect_columns(m.mean(axis=0), kind)
    draws = effect_columns(bootstrap_means(m, samples, np.random.default_rng(seed)), kind)
    diff = draws[:, 1] - draws[:, 0]
    ci = percentile_ci(diff, level)
    estimate = float(point[1] - point[0])
    outcome: Outcome = three_valued(ci, margin)
    why = (f"{level:.0%} CI of effect(SAS) - effect(DIM) [{ci[0]:+.3f}, {ci[1]:+.3f}] vs -margin {-margin:+.3f}")
    if dim.strength is None:
        outcome, why = "inconclusive", f"no DIM strength within the side-effect budget: {dim.reason}"
    elif sas.strength is None:
        outcome, why = "fails", f"no SAS strength within the side-effect budget: {sas.reason}"
    return {
        "kind": kind, "operator": operator, "judged_on": label,
        "estimate": estimate, "ci": list(ci), "margin": margin, "outcome": outcome, "reason": why,
        "resampling_unit": RESAMPLING_UNIT, "n_units": len(sources), "ci_level": level, "bootstrap_samples": samples,
        "strength_chosen_on": "selection",
        "effect": {"dim": float(point[0]), "sas": float(point[1])},
        "effect_ci": {"dim": list(percentile_ci(draws[:, 0], level)), "sas": list(percentile_ci(draws[:, 1], level))},
        "baseline_rate": float(m[:, 0].mean()),
        "arms": {"dim": _chosen(dim), "sas": _chosen(sas)},
    }


def _chosen(c: StrengthChoice) -> dict[str, Any]:
    return {"arm": c.arm, "strength": c.strength, "selection_effect": c.effect, "selection_side_effect": c.side_effect,
            "reason": c.reason}


def reported_arm(table: Mapping[Cond, Mapping[Unit, bool]], choice: StrengthChoice, samples: int, seed: int,
                 level: float) -> dict[str, Any]:
    """A reported-only arm (latent-level SAS) at its chosen strength: effect and CI, no comparison."""
    label = KINDS[choice.kind].judged_on
    sources, m = source_matrix(table, [(BASELINE, 0.0, label), _arm_cond(choice, label)])
    draws = effect_columns(bootstrap_means(m, samples, np.random.default_rng(seed)), choice.kind)[:, 0]
    return {"arm": choice.arm, "kind": choice.kind, "operator": choice.operator, "method": choice.method,
            "strength": choice.strength, "strength_chosen_on": "selection",
            "effect": float(effect_columns(m.mean(axis=0), choice.kind)[0]), "effect_ci": list(percentile_ci(draws, level)),
            "resampling_unit": RESAMPLING_UNIT, "n_units": len(sources), "compared": False,
            "note": "latent-level SAS (SAE latents zeroed inside the SAE, error term kept): another operator than "
                    "directional ablation, so it is reported, never compared with DIM"}


def point_estimates(table: Mapping[Cond, Mapping[Unit, bool]], strengths: Strengths) -> dict[str, float]:
    """{kind: effect(SAS) - effect(DIM)} at the chosen strengths (point estimates), for the stability cells."""
    out = {}
    for kind, operator in COMPARED:
        label = KINDS[kind].judged_on
        cols = [(BASELINE, 0.0, label), _arm_cond(strengths.choices[arm_name("dim", operator)], label),
                _arm_cond(strengths.choices[arm_name("sas", operator)], label)]
        _, m = source_matrix(table, cols)
        e = effect_columns(m.mean(axis=0), kind)
        out[kind] = float(e[1] - e[0])
    return out


def restrict(table: Mapping[Cond, Mapping[Unit, bool]], keep: Any) -> dict[Cond, dict[Unit, bool]]:
    """The table on the units `keep(unit)` selects (cells, halves)."""
    return {c: {u: v for u, v in col.items() if keep(u)} for c, col in table.items()}


def rate_cis(table: Mapping[Cond, Mapping[Unit, bool]], conds: Sequence[Cond], samples: int, seed: int,
             level: float) -> dict[Cond, tuple[float, float, float]]:
    """(rate, lo, hi) of each condition, from a cluster bootstrap over its source prompts."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in conds:
        _, m = source_matrix(table, [c])
        lo, hi = percentile_ci(bootstrap_means(m, samples, rng)[:, 0], level)
        out[c] = (float(m.mean()), lo, hi)
    return out


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# --------------------------------------------------------------------------- artifacts

GENERATIONS_FILE = "generations.jsonl"
SCORES_FILE = "scores.jsonl"
SIDE_EFFECTS_FILE = "side_effects.json"


def load_eval(params: "Params", paths: "Paths") -> tuple[list[ScoreRow], dict[Cond, dict[Unit, bool]], Strengths]:
    """(eval score rows, their outcome table, the strengths chosen on selection) for validity and stability."""
    rows = read_rows(paths.score_dir / SCORES_FILE, ScoreRow)
    bad = sorted({r.split for r in rows} - {"eval"})
    if bad:
        raise ArtifactError(f"{paths.score_dir / SCORES_FILE} holds {bad}-split rows; the gates judge the eval split only")
    strengths = read_strengths(paths.calibrate_dir / STRENGTHS_FILE)
    return rows, outcomes(rows), strengths


def sas_tuple_ref(params: "Params", strengths: Strengths) -> dict[str, Any]:
    """The SAS tuple (the compared hook's tuple) as a gate TupleRef (model, layer, site)."""
    t = next((t for t in params.tuples if t.hook_name == strengths.hook), None)
    if t is None:
        raise ArtifactError(f"the strengths were calibrated at {strengths.hook}, which is no required tuple's hook; "
                            "rerun `dvc repro calibrate`")
    return {"model": params.model.name, "layer": t.layer, "site": t.site}
