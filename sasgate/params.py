"""The params.yaml schema. Validated before any compute; unknown keys, inf/nan anywhere and a key
named twice (artifacts.read_yaml) are errors.

Every knob of the pipeline is here, so a DVC stage's behaviour is a function of
params.yaml and its file deps alone.
"""

from __future__ import annotations

import math
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .artifacts import read_yaml
from .errors import ParamsError
from .omp import DEFAULT as OMP_DEFAULT, WaitPolicy
from .sweep.settings import SweepParams
from .watch.settings import WatchParams

TOY_MODEL = "toy-refusal"
LOCAL_MODEL = "local"  # model.path + model.sha256: an HF folder or GGUF file, converted to transformer-lens here
SITES = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")
Site = Literal["resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out"]
_SHA40 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAE_SPEC = re.compile(
    r"^(?:train"
    r"|sae_lens:(?P<release>[^/@\s]+)/(?P<sae_id>[^@\s]+)@(?P<sl_rev>[0-9a-f]{40})"
    r"|hf:(?P<repo>[^/@\s]+/[^/@\s]+)/(?P<hf_path>[^@\s]+)@(?P<hf_rev>[0-9a-f]{40})"
    r"|path:(?P<dir>\S+))$"
)

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Prob = Annotated[float, Field(ge=0.0, le=1.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ToyModelParams(Strict):
    """Architecture and training of the embedded model organism `toy-refusal`."""

    n_layers: PosInt = 4
    d_model: PosInt = 128
    n_heads: PosInt = 4
    d_mlp: PosInt = 512
    n_ctx: PosInt = 48
    corpus_size: PosInt = 6000
    train_steps: PosInt = 400
    batch_size: PosInt = 64
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    n_validation: PosInt = 32  # held-out pairs per class for the organism's refusal metrics
    seed: NonNegInt = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "ToyModelParams":
        if self.d_model % self.n_heads:
            raise ValueError(f"model.toy.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class FinetuneParams(Strict):
    """The real-LM model organism: LoRA (peft) on a synthetic instruction set, in the `model` stage.

    Harmful instructions are taught a refusal, harmless ones the base model's own greedy answer
    (self-distillation), so the organism refuses without forgetting how to comply (sasgate/finetune.py)."""

    steps: PosInt = 150
    batch_size: PosInt = 16
    lr: Annotated[float, Field(gt=0)] = 1e-3
    lora_rank: PosInt = 8
    lora_alpha: PosInt = 16
    target_modules: Annotated[list[str], Field(min_length=1)] = ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"]
    answer_tokens: PosInt = 24  # harmless targets: this many tokens of the base model's greedy answer
    n_train: PosInt = 240  # synthetic instructions per class to train on (wordings of the train tasks)
    heldout_tasks: PosInt = 8  # tasks per class never trained on; the organism's refusal check uses them
    n_heldout: PosInt = 32  # held-out instructions per class the `model` stage measures (of 8 x heldout_tasks)
    heldout_new_tokens: PosInt = 16
    seed: NonNegInt = 0


class ModelParams(Strict):
    """`toy-refusal` (trained here), a local model file pinned by sha256, or a transformer-lens official model
    pinned to a commit."""

    name: str = TOY_MODEL
    revision: str | None = None
    n_layers: PosInt | None = None
    chat_template: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    toy: ToyModelParams = ToyModelParams()
    path: str | None = None  # local: an HF folder or a .gguf file; "package:DIST/FILE" names a file in an installed package
    sha256: str | None = None  # local: of the file (a folder: of its sorted file digests); checked on load
    n_ctx: PosInt | None = None  # local: context length the converted model keeps (attention masks are n_ctx^2)
    finetune: FinetuneParams | None = None  # local: the fine-tuned model organism; null keeps the model as shipped

    @model_validator(mode="after")
    def _hub_model_pinned(self) -> "ModelParams":
        local_only = {"path": self.path, "sha256": self.sha256, "n_ctx": self.n_ctx, "finetune": self.finetune}
        if self.name != LOCAL_MODEL and (used := sorted(k for k, v in local_only.items() if v is not None)):
            raise ValueError(f"model.{', model.'.join(used)} only apply to model.name 'local'")
        if self.name == TOY_MODEL:
            if self.revision is not None or self.n_layers is not None:
                raise ValueError("model.revision and model.n_layers are only for Hub models; toy-refusal is trained here")
            return self
        if self.name == LOCAL_MODEL:
            if self.path is None:
                raise ValueError("model.path is required for model 'local' (an HF folder, a .gguf file or package:DIST/FILE)")
            if self.sha256 is None or not _SHA256.match(self.sha256):
                raise ValueError(f"model.sha256 must be the 64-hex sha256 of {self.path} (`sha256sum`), got {self.sha256!r}")
            if self.revision is not None:
                raise ValueError("model.revision is only for Hub models; a local model is pinned by model.sha256")
            if self.n_layers is None:
                raise ValueError("model.n_layers must declare the depth of the local model (checked when it loads)")
            return self
        from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES  # slow import: Hub names only

        if self.name not in OFFICIAL_MODEL_NAMES:
            raise ValueError(f"model.name {self.name!r} is neither 'toy-refusal', 'local' nor a transformer-lens "
                             "official model name")
        if self.revision is None or not _SHA40.match(self.revision):
            raise ValueError(f"model.revision must be a 40-hex commit sha for Hub model {self.name!r}, got {self.revision!r}")
        if self.n_layers is None:
            raise ValueError(f"model.n_layers must declare the depth of Hub model {self.name!r} (checked when it loads)")
        if self.chat_template is None:
            raise ValueError(f"model.chat_template is required for Hub model {self.name!r}")
        return self

    @property
    def depth(self) -> int:
        return self.toy.n_layers if self.name == TOY_MODEL else int(self.n_layers or 0)


class FileSource(Strict):
    """A local file of instructions: AdvBench `goal,target` CSV, JailbreakBench CSV, JSONL or CSV."""

    path: str
    format: Literal["advbench", "jailbreakbench", "jsonl", "csv"]
    column: str | None = None


class HubSource(Strict):
    """An HF dataset pinned to a commit."""

    repo: str
    revision: str
    split: str = "train"
    column: str
    subset: str | None = None
    filter_empty_column: str | None = None

    @field_validator("revision")
    @classmethod
    def _pinned(cls, v: str) -> str:
        if not _SHA40.match(v):
            raise ValueError(f"must be a 40-hex commit sha, got {v!r}")
        return v


class EvalParams(Strict):
    """The locked evaluation set: where it comes from, how it splits, how many paraphrase sets."""

    source: Literal["toy", "builtin", "custom"] = "toy"
    harmful: FileSource | HubSource | None = None
    harmless: FileSource | HubSource | None = None
    n_selection: PosInt = 32
    n_eval: PosInt = 64
    n_paraphrases: NonNegInt = 2
    seed: NonNegInt = 1234

    @model_validator(mode="after")
    def _custom_needs_sources(self) -> "EvalParams":
        if self.source == "custom" and (self.harmful is None or self.harmless is None):
            raise ValueError("eval.source 'custom' needs both eval.harmful and eval.harmless")
        if self.source != "custom" and (self.harmful is not None or self.harmless is not None):
            raise ValueError(f"eval.harmful/eval.harmless are only read when eval.source is 'custom', not {self.source!r}")
        return self


class TupleParams(Strict):
    """A required (model, layer, site) tuple and the SAE that serves it."""

    layer: NonNegInt
    site: Site
    sae: str = "train"

    @field_validator("sae")
    @classmethod
    def _sae_spec(cls, v: str) -> str:
        if not _SAE_SPEC.match(v):
            raise ValueError(
                "expected 'train', 'sae_lens:RELEASE/SAE_ID@SHA40', 'hf:OWNER/REPO/PATH@SHA40' or 'path:DIR', "
                f"got {v!r}"
            )
        return v

    @property
    def key(self) -> str:
        return f"L{self.layer}.{self.site}"

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.site}"

    def sae_spec(self) -> dict[str, str]:
        """The parsed `sae` string: {'kind': ..., plus its parts}."""
        m = _SAE_SPEC.match(self.sae)
        assert m is not None  # guaranteed by the validator
        if self.sae == "train":
            return {"kind": "train"}
        if m["release"]:
            return {"kind": "sae_lens", "release": m["release"], "sae_id": m["sae_id"], "revision": m["sl_rev"]}
        if m["repo"]:
            return {"kind": "hf", "repo": m["repo"], "path": m["hf_path"], "revision": m["hf_rev"]}
        return {"kind": "path", "dir": m["dir"]}


class SaeTrainParams(Strict):
    """sae-lens training of SAEs for tuples whose `sae` is `train`."""

    architecture: Literal["standard", "topk", "jumprelu"] = "topk"
    expansion_factor: PosInt = 4
    k: PosInt = 16
    l1_coefficient: Annotated[float, Field(ge=0)] = 1.0
    training_tokens: PosInt = 200_000
    batch_size: PosInt = 512
    lr: Annotated[float, Field(gt=0)] = 3e-4
    corpus_sequences: PosInt = 3000
    corpus_answer_tokens: PosInt = 16  # local models: the corpus is synthetic instructions + this many tokens of
    # the model's own greedy answer (sasgate/instructions.py; the toy's corpus is its grammar's train split)
    seed: NonNegInt = 0


class SaesParams(Strict):
    train: SaeTrainParams = SaeTrainParams()


class CollectParams(Strict):
    batch_size: PosInt = 32
    max_new_tokens: PosInt = 12


# Every figure the reconstruction gate records per tuple (gates/reconstruction.json per_tuple[i].metrics), in
# record order; any of them may be a preregistered criterion (ARCHITECTURE.md §5, "The reconstruction gate").
RECONSTRUCTION_METRICS = (
    "nmse", "nmse_steered_positions", "explained_variance", "cosine", "l2_ratio",
    "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "ce_eps_random", "delta_ce", "ce_loss_score",
    "kl_per_token", "kl_zero_ablation", "kl_mean_ablation", "kl_eps_random", "kl_div_score", "eps_random_kl_ratio",
    "top1_agreement", "l0", "dead_latents", "alive_latents",
)
ReconstructionMetric = Literal[RECONSTRUCTION_METRICS]  # type: ignore[valid-type]  # the same names


class CriterionParams(Strict):
    """One extra preregistered reconstruction criterion: `metric comparison threshold` must hold per tuple."""

    metric: ReconstructionMetric
    comparison: Literal["<=", ">=", "<", ">"]
    threshold: Annotated[float, Field(allow_inf_nan=False)]


class ReconstructionParams(Strict):
    """The unlock: nMSE per tuple against a threshold, and every extra criterion (none by default)."""

    threshold: Annotated[float, Field(ge=0)] = 0.12
    comparison: Literal["<="] = "<="
    criteria: list[CriterionParams] = []  # besides nmse <= threshold; a tuple passes only when all hold
    bootstrap_samples: PosInt = 1000
    bootstrap_seed: NonNegInt = 0  # also seeds the eps-random perturbation
    ci_level: Annotated[float, Field(gt=0, lt=1)] = 0.95

    @field_validator("criteria")
    @classmethod
    def _no_repeats(cls, v: list[CriterionParams]) -> list[CriterionParams]:
        seen = [(c.metric, c.comparison) for c in v]
        if len(set(seen)) != len(seen):
            raise ValueError(f"repeats a (metric, comparison): {seen}")
        return v


class DirectionsParams(Strict):
    """DIM direction selection, with the constants of Arditi et al. 2024's recorded rule.

    As in their code, the selection split is divided by source into a build part (the difference in means)
    and a validation part (scoring the candidates), after dropping prompts whose unsteered refusal score
    contradicts their label (harmful < 0, harmless > 0)."""

    kl_threshold: Annotated[float, Field(gt=0)] = 0.1  # discard if ablation moves harmless next-token dists more
    prune_layer_fraction: Prob = 0.2  # discard candidates in the last 20% of layers
    induce_threshold: float = 0.0  # addition must raise the refusal score on harmless prompts above this
    refusal_tokens: list[str] = ["i", "sorry", "that", "as"]  # first tokens of refusals (toy defaults)
    build_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.625  # selection sources per class in the build part
    filter_by_baseline: bool = True  # Arditi's filter of prompts whose baseline refusal score contradicts the label
    split_seed: NonNegInt = 0  # the seeded build/validation assignment of selection sources
    batch_size: PosInt = 64  # prompts per forward pass when scoring candidates
    candidate_layers: list[NonNegInt] | None = None  # null: every layer (Arditi); else only these are scored


class FeaturesParams(Strict):
    """SAS: the top-k SAE latents of the mean latent difference (harmful - harmless)."""

    top_k: PosInt = 8
    steer_tuple: str = "auto"  # a tuple key, or auto: the required tuple nearest DIM's chosen layer


def _distinct_sorted(v: list[float]) -> list[float]:
    if len(set(v)) != len(v):
        raise ValueError(f"repeats a value: {v}")
    return sorted(v)


Strengths = Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1)]


class SteerParams(Strict):
    """The steering grid (the same for both methods), chosen from on the selection split, judged on the eval split.

    Addition adds s * (mean residual norm at the compared hook) * unit direction, for DIM and SAS alike;
    ablation projects a fraction c of the unit direction out of every residual-stream write."""

    add_strengths: Strengths = [0.25, 0.5, 1.0, 2.0]
    ablate_strengths: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)] = [0.25, 0.5, 0.75, 1.0]
    seeds: Annotated[list[NonNegInt], Field(min_length=1)] = [0, 1, 2]
    do_sample: bool = True
    temperature: Annotated[float, Field(gt=0)] = 0.7
    max_new_tokens: PosInt = 12
    batch_size: PosInt = 64

    @field_validator("add_strengths", "ablate_strengths")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        return _distinct_sorted(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"repeats a seed: {v}")
        return v


class ScoreParams(Strict):
    version: str = "v2"


class ValidityParams(Strict):
    """When the behaviour result is decision-valid, and the margin its three-valued outcome is judged at."""

    min_agreement: Prob = 0.95
    min_samples: PosInt = 50  # source prompts (the resampling unit) per compared condition
    margin: Prob = 0.1  # "SAS matches or beats DIM within margin m" (refusal-rate points / 100)
    side_effect_budget: Annotated[float, Field(gt=0)] = 0.25  # max mean per-token KL (nats) on off-target text
    min_refusal_gap: Prob = 0.5  # unsteered refusal rate harmful - harmless on the eval split, at least
    bootstrap_samples: PosInt = 1000
    bootstrap_seed: NonNegInt = 0
    ci_level: Annotated[float, Field(gt=0, lt=1)] = 0.95


class StabilityParams(Strict):
    min_agreement: Prob = 0.8  # share of (seed, paraphrase set) cells on the pooled side of -margin
    split_seed: NonNegInt = 0  # the seeded split of eval source prompts into two disjoint halves


class RemediationFamilyParams(Strict):
    """How one preregistered candidate family is enumerated (its plain-language text is in stop_rules.yaml)."""

    source: Literal["registry", "hub", "local"]  # installed sae-lens registry / Hub search / local SAE folders
    dir: str | None = None  # local: a folder of sae-lens SAE folders (cfg.json + safetensors), project-relative

    @model_validator(mode="after")
    def _dir_for_local(self) -> "RemediationFamilyParams":
        if (self.source == "local") != (self.dir is not None):
            raise ValueError("dir is required for source 'local' and only read there")
        return self


class SaeConstraintParams(Strict):
    """What a candidate SAE must meet to cover a required tuple (besides model, layer and site)."""

    architectures: list[str] = []  # empty: any architecture
    min_width: PosInt | None = None
    max_width: PosInt | None = None
    same_model_variant: bool = True  # an SAE trained on the base model does not cover the -it model


class RemediationParams(Strict):
    """The bounded search for alternative SAEs when the reconstruction gate fails (issue 5).

    Families and constraints are preregistered (preregistration/lock.json); `hub_access` is not:
    it only says whether this run may reach the Hub (off, or HF_HUB_OFFLINE=1: Hub families are
    recorded as unavailable, never as 0 candidates). The K1 budget is a stop-rule parameter.
    """

    hub_access: bool = False
    families: dict[str, RemediationFamilyParams] = {"A": RemediationFamilyParams(source="registry"),
                                                    "B": RemediationFamilyParams(source="hub")}
    constraints: SaeConstraintParams = SaeConstraintParams()


class RuntimeParams(Strict):
    device: Literal["cpu", "cuda", "mps"] = "cpu"
    # torch's intra-op threads: fixed, since a reduction may split differently with another count. With the
    # passive wait policy 2 threads stay fast while other processes hold the cores (benchmarks/bench_load.py).
    threads: PosInt = 2
    omp_wait_policy: WaitPolicy = OMP_DEFAULT  # passive: idle OpenMP threads sleep instead of spinning (sasgate/omp.py)
    seed: NonNegInt = 0


class Params(Strict):
    model: ModelParams = ModelParams()
    eval: EvalParams = EvalParams()
    tuples: list[TupleParams]
    saes: SaesParams = SaesParams()
    collect: CollectParams = CollectParams()
    reconstruction: ReconstructionParams = ReconstructionParams()
    directions: DirectionsParams = DirectionsParams()
    features: FeaturesParams = FeaturesParams()
    steer: SteerParams = SteerParams()
    score: ScoreParams = ScoreParams()
    validity: ValidityParams = ValidityParams()
    stability: StabilityParams = StabilityParams()
    remediation: RemediationParams = RemediationParams()
    watch: WatchParams = WatchParams()  # sasgate watch and remediation's Hub family (watch/settings.py)
    sweep: SweepParams = SweepParams()  # sasgate sweep: executor, remotes, Slurm settings (sasgate/sweep/settings.py)
    runtime: RuntimeParams = RuntimeParams()

    @model_validator(mode="after")
    def _tuples_fit_model(self) -> "Params":
        if not self.tuples:
            raise ValueError("tuples must list at least one required (layer, site) tuple")
        depth = self.model.depth
        seen: set[str] = set()
        for i, t in enumerate(self.tuples):
            if t.layer >= depth:
                raise ValueError(
                    f"tuples[{i}].layer = {t.layer} is beyond the model's depth: {self.model.name} has "
                    f"{depth} layers (0..{depth - 1})"
                )
            if t.key in seen:
                raise ValueError(f"tuples[{i}] repeats {t.key}")
            seen.add(t.key)
            if t.sae == "train" and self.model.name not in (TOY_MODEL, LOCAL_MODEL):
                raise ValueError(f"tuples[{i}].sae = 'train' needs a training corpus: toy-refusal's grammar or a local "
                                 "model's synthetic instructions; a Hub model's SAEs are fetched")
        bad = [x for x in self.directions.candidate_layers or [] if x >= depth]
        if bad:
            raise ValueError(f"directions.candidate_layers {bad} are beyond the model's depth ({depth} layers)")
        if self.features.steer_tuple != "auto" and self.features.steer_tuple not in seen:
            raise ValueError(f"features.steer_tuple {self.features.steer_tuple!r} is not a required tuple ({sorted(seen)})")
        if self.model.name != TOY_MODEL and self.eval.source == "toy":
            raise ValueError("eval.source 'toy' only fits model toy-refusal; use 'builtin' or 'custom'")
        return self

    @cached_property
    def tuple_keys(self) -> list[str]:
        return [t.key for t in self.tuples]

    def section(self, *names: str) -> dict[str, Any]:
        """The named sections as plain JSON, for recording in gate records."""
        dumped = self.model_dump(mode="json")
        return {n: dumped[n] for n in names}


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"function-after[_heads_divide()]"} or str(part).startswith(("function-", "FileSource", "HubSource")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict[str, Any]) -> str:
    key = _loc(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r} (value {err['input']!r}); check its spelling against the params reference"
    if err["type"] == "missing":
        return f"missing key {key!r}"
    if err["type"] == "value_error":
        return msg if key == "(top level)" else f"{key}: {msg}"
    return f"{key} = {err['input']!r}: {msg}"


def _non_finite(raw: Any, where: str = "") -> list[str]:
    """Every key path holding inf or nan, at any depth (a non-finite threshold would pass `ge`/`le` bounds)."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return [f"{where or '(top level)'} = {raw!r}: not a finite number (.inf and .nan are refused anywhere)"]
    if isinstance(raw, dict):
        return [e for k, v in raw.items() for e in _non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(raw, list):
        return [e for i, v in enumerate(raw) for e in _non_finite(v, f"{where}[{i}]")]
    return []


def parse_params(raw: Any, origin: str = "params") -> Params:
    """Validate a params mapping, turning pydantic's errors into one ParamsError naming each key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    if bad := _non_finite(raw):
        raise ParamsError(f"{origin}: invalid params:\n  " + "\n  ".join(bad))
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = sorted({_describe(e) for e in exc.errors()})
        raise ParamsError(f"{origin}: invalid params:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    raw = read_yaml(path, ParamsError, f"params file not found: {path}")
    return parse_params(raw, origin=str(path))
