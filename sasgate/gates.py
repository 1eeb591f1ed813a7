"""Gate records (ARCHITECTURE.md §5 "Gate records"): one typed JSON file per gate, validated on read.

Every gate (reconstruction, behaviour, stability, remediation) writes the same shape:

    {"schema": "sasgate.gate/2", "gate": "reconstruction", "status": "fail",
     "metric": "nmse", "threshold": 0.12, "comparison": "<=",
     "per_tuple": [{"tuple": {"model": ..., "layer": 1, "site": "resid_post"},
                    "observed": 0.163, "ci95": [0.158, 0.169], "status": "fail", "extra": {...}}],
     "inputs": {"artifacts/saes/...": "sha256:..."}, "params": {...},
     "reason": "nMSE above threshold on 4/4 required tuples", "details": {...}}

Unknown fields are errors; so are missing required ones (DESIGN rule 4). `extra`
(per tuple) and `details` (per gate) hold gate-specific numbers (cosine, L0, the
token set...) without loosening the common schema; the reconstruction gate's rows also carry
typed `metrics` (finite numbers by name) and `criteria` (what was judged, ARCHITECTURE.md §5). `inputs` maps project-relative
posix paths to "sha256:<64 hex>", so a record never holds an absolute path.
"""

from __future__ import annotations

import math
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from .artifacts import atomic_write_json, read_json, sha256_file
from .errors import ArtifactError
from .validation import describe_validation

GATE_SCHEMA = "sasgate.gate/2"
GateStatus = Literal["pass", "fail", "not_needed"]
TupleStatus = Literal["pass", "fail", "not_needed"]
Comparison = Literal["<=", "<", ">=", ">", "=="]
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
Outcome = Literal["holds", "fails", "inconclusive"]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Interval = tuple[Finite, Finite]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TupleRef(_Record):
    """A required (model, layer, site) tuple."""

    model: str
    layer: int = Field(ge=0)
    site: str


class CriterionResult(_Record):
    """One criterion a tuple gate judged on a row: `observed comparison threshold`, and whether it held."""

    metric: str = Field(min_length=1)
    comparison: Literal["<=", "<", ">=", ">"]
    threshold: Finite
    observed: Finite
    passed: bool = Field(alias="pass")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class TupleResult(_Record):
    """The gate's metric on one required tuple; `metrics` (every figure, by name) and `criteria` (the ones the
    gate judged) are the reconstruction gate's (ARCHITECTURE.md §5) and absent from other gates' rows."""

    tuple: TupleRef
    observed: float | None
    ci95: tuple[float, float] | None  # the bootstrap interval at the gate's ci level (named as in ARCHITECTURE.md §5)
    status: TupleStatus
    extra: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[Annotated[str, Field(min_length=1)], Annotated[float, Field(strict=True, allow_inf_nan=False)]] | None = None
    criteria: list[CriterionResult] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        """Rows without metrics / criteria serialise as before (other gates' records keep their bytes)."""
        out = handler(self)
        for name in ("metrics", "criteria"):
            if out.get(name) is None:
                out.pop(name, None)
        return out

    @field_validator("observed")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        return v

    @field_validator("ci95")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] <= v[1]):
            raise ValueError(f"must be a finite interval [lo, hi] with lo <= hi, got {list(v)}")
        return v


class ArmChoice(_Record):
    """One method's arm in a comparison: the strength chosen on the selection split and what it was chosen at."""

    arm: str
    strength: Finite | None  # None: no strength within the side-effect budget (the arm is left unsteered)
    selection_effect: Finite | None
    selection_side_effect: Finite | None
    eval_side_effect: Finite | None  # the same side-effect measure at that strength on the eval split (reported)
    reason: str


class ComparisonResult(_Record):
    """effect(SAS) - effect(DIM) for one (kind, operator) on the eval split, and its three-valued outcome."""

    kind: Literal["induce", "bypass"]
    operator: Literal["addition", "directional_ablation"]
    judged_on: Literal["harmful", "harmless"]
    estimate: Finite
    ci: Interval
    margin: Annotated[float, Field(ge=0, le=1)]
    outcome: Outcome
    reason: str = Field(min_length=1)
    resampling_unit: Literal["source_prompt"]
    n_units: int = Field(ge=1)  # source prompts
    ci_level: Annotated[float, Field(gt=0, lt=1)]
    bootstrap_samples: int = Field(ge=1)
    strength_chosen_on: Literal["selection"]
    effect: dict[Literal["dim", "sas"], Finite]
    effect_ci: dict[Literal["dim", "sas"], Interval]
    baseline_rate: Annotated[float, Field(ge=0, le=1)]
    arms: dict[Literal["dim", "sas"], ArmChoice]

    @field_validator("ci")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"must be an interval [lo, hi] with lo <= hi, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _both_methods(self) -> "ComparisonResult":
        for name in ("effect", "effect_ci", "arms"):
            if set(getattr(self, name)) != {"dim", "sas"}:
                raise ValueError(f"{name} must hold exactly 'dim' and 'sas'")
        return self


class GateRecord(_Record):
    """One gate's verdict and everything it rests on."""

    schema_: Literal["sasgate.gate/2"] = Field(alias="schema")
    gate: str = Field(min_length=1)
    status: GateStatus
    metric: str
    threshold: float | None
    comparison: Comparison | None
    per_tuple: list[TupleResult]
    inputs: dict[str, str]
    params: dict[str, Any]
    reason: str = Field(min_length=1)
    details: dict[str, Any] | None = None
    comparisons: list[ComparisonResult] | None = None  # the behaviour gate only (ARCHITECTURE.md, section 5)
    outcome: Outcome | None = None  # the behaviour gate only: over its comparisons

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: dict[str, str]) -> dict[str, str]:
        for rel, digest in v.items():
            p = PurePosixPath(rel)
            if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or re.match(r"^[A-Za-z]:", rel):
                raise ValueError(f"input path {rel!r} must be relative to the project root (posix, no '..')")
            if not _DIGEST.match(digest):
                raise ValueError(f"input {rel!r}: digest must be 'sha256:<64 lowercase hex>', got {digest!r}")
        return v

    @model_validator(mode="after")
    def _threshold_pairs(self) -> "GateRecord":
        if (self.threshold is None) != (self.comparison is None):
            raise ValueError("threshold and comparison must both be set or both be null")
        is_behaviour = self.gate == "behaviour"
        if is_behaviour != (self.comparisons is not None) or is_behaviour != (self.outcome is not None):
            raise ValueError("comparisons and outcome are required on the behaviour gate and only there")
        return self

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON (key `schema`, not the python attribute name; the behaviour-only fields
        appear only on the behaviour gate)."""
        skip = {"comparisons", "outcome"} if self.comparisons is None else set()
        return self.model_dump(mode="json", by_alias=True, exclude=skip)


def compare(observed: float, comparison: str, threshold: float) -> bool:
    """`observed <comparison> threshold`, the one place a gate's comparison is evaluated."""
    ops = {"<=": observed <= threshold, "<": observed < threshold, ">=": observed >= threshold,
           ">": observed > threshold, "==": observed == threshold}
    if comparison not in ops:
        raise ValueError(f"unknown comparison {comparison!r}")
    return ops[comparison]


def input_digests(root: Path, files: list[Path]) -> dict[str, str]:
    """{project-relative posix path: "sha256:..."} for the files a gate read."""
    out: dict[str, str] = {}
    for f in files:
        if not f.is_file():
            raise ArtifactError(f"missing gate input {f}")
        try:
            rel = f.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise ArtifactError(f"gate input {f} is outside the project root {root}") from None
        out[rel] = "sha256:" + sha256_file(f)
    return out


def validate_gate(raw: Any, origin: str = "gate record") -> GateRecord:
    """A GateRecord from plain JSON; any schema problem is one ArtifactError naming the fields."""
    if not isinstance(raw, dict):
        raise ArtifactError(f"{origin}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("schema") != GATE_SCHEMA:
        raise ArtifactError(f"{origin}: schema is {raw.get('schema')!r}, expected {GATE_SCHEMA!r}")
    try:
        return GateRecord.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{origin}: invalid gate record: {describe_validation(exc)}") from None


def write_gate(path: str | Path, record: GateRecord | dict[str, Any]) -> GateRecord:
    """Validate, then write the record atomically as canonical JSON; returns the validated record."""
    rec = record if isinstance(record, GateRecord) else validate_gate(record, origin=str(path))
    # round-trip through JSON validation, so what is written is exactly what read_gate accepts
    rec = validate_gate(rec.to_json(), origin=str(path))
    atomic_write_json(path, rec.to_json())
    return rec


def read_gate(path: str | Path, gate: str | None = None) -> GateRecord:
    """Read and validate a gate record; missing, corrupt or schema-invalid files raise ArtifactError."""
    path = Path(path)
    raw = read_json(path)  # ArtifactError on missing / corrupt JSON
    rec = validate_gate(raw, origin=str(path))
    if gate is not None and rec.gate != gate:
        raise ArtifactError(f"{path}: holds the {rec.gate!r} gate, expected {gate!r}")
    return rec
