"""The claim catalogue: every claim sasgate grants or withholds, and the gate records it rests on.

Claims are derived from gate records by rule, never typed by hand (ARCHITECTURE.md, "Claims").
A *finding* is either allowed or disallowed (it then appears under "We cannot claim"); a
*limitation* is a negative result, stated only when it holds. The rules:

* behaviour-level claims only when the validity (`behaviour`) and `stability` gates passed;
* "SAS matches DIM" only when the behaviour outcome `holds`, "SAS falls short of DIM" only when it
  `fails`: an `inconclusive` outcome allows neither;
* robustness only as tested: across the declared paraphrase families when every one held (each named
  with how it was made); robustness to rewording without restriction is never allowed, since no
  finite set of tested wordings can carry it;
* mechanism-level and causal claims only when `reconstruction` passed as well;
* phase movement exactly when the state machine authorizes it.

`sasgate.claims_lint` keeps one set of patterns per finding, so every claim that can be
withheld can also be caught in prose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

GATES = ("behaviour", "stability", "reconstruction", "remediation")
ABSENT = "absent"


@dataclass(frozen=True)
class Condition:
    """`gate`'s status is one of `statuses`."""

    gate: str
    statuses: frozenset[str]

    def describe(self) -> str:
        return f"{self.gate} {' or '.join(sorted(self.statuses))}"


def _on(gate: str, *statuses: str) -> Condition:
    return Condition(gate, frozenset(statuses))


@dataclass(frozen=True)
class Facts:
    """What the claim rules read: each gate's status, the behaviour outcome, the paraphrase coverage."""

    status: Mapping[str, str]
    paraphrase_families_declared: int | None = None  # besides the original wording; None: not recorded
    paraphrase_families_stable: int | None = None  # of those, how many held in the stability gate
    families: tuple[str, ...] = ()  # how each declared family was made, as the stability record says
    outcome: str | None = None  # the behaviour gate's three-valued outcome; None: not recorded


@dataclass(frozen=True)
class Claim:
    id: str
    kind: Literal["finding", "limitation"]
    text: str
    conditions: tuple[Condition, ...]
    match: Literal["all", "any"] = "all"
    every_paraphrase_family: bool = False
    outcome: str | None = None  # allowed only when the behaviour outcome is this
    never: str | None = None  # a claim no finite test can carry: always disallowed, for this reason

    @property
    def rests_on(self) -> list[str]:
        return [g for g in GATES if any(c.gate == g for c in self.conditions)]

    def judge(self, facts: Facts) -> tuple[bool, str]:
        """(allowed, why): why names the gate statuses (and outcome, families) the verdict follows from."""
        if self.never is not None:
            return False, self.never
        seen = {c: facts.status.get(c.gate, ABSENT) in c.statuses for c in self.conditions}
        now = ", ".join(f"{g} {facts.status.get(g, ABSENT)}" for g in self.rests_on)
        held = all(seen.values()) if self.match == "all" else any(seen.values())
        if not held:
            need = (" and " if self.match == "all" else " or ").join(c.describe() for c in self.conditions)
            return False, f"needs {need}; recorded: {now}"
        if self.outcome is not None and facts.outcome != self.outcome:
            return False, f"needs the behaviour outcome {self.outcome}; recorded: {facts.outcome or 'none'}"
        if self.outcome is not None:
            now += f"; behaviour outcome {facts.outcome}"
        if self.every_paraphrase_family:
            declared, stable = facts.paraphrase_families_declared, facts.paraphrase_families_stable
            if not declared or stable is None or stable < declared:
                return False, (f"needs stability over every declared paraphrase family; recorded: "
                               f"{_families(declared, stable)}")
            named = f": {'; '.join(facts.families)}" if facts.families else ""
            return True, f"{now}; stable over {stable}/{declared} declared paraphrase families{named}"
        return True, now


def _families(declared: int | None, stable: int | None) -> str:
    if declared is None:
        return "no (seed, paraphrase set) cells in the stability record"
    if declared == 0:
        return "no paraphrase family declared besides the original wording"
    return f"stable over {stable if stable is not None else 'unknown'}/{declared} declared paraphrase families"


_BEHAVIOUR_OK = (_on("behaviour", "pass"), _on("stability", "pass"))
_MECHANISM_OK = (*_BEHAVIOUR_OK, _on("reconstruction", "pass"))

CATALOGUE: tuple[Claim, ...] = (
    Claim("behaviour-decision-valid", "finding",
          "The behaviour-level comparison of SAS and DIM steering of refusal, as stated in the behaviour gate "
          "record, is decision-valid on the locked evaluation set: the scorer agreed with the labelled check set, "
          "every condition met the minimum sample size, and the comparison carries bootstrap confidence intervals.",
          _BEHAVIOUR_OK),
    Claim("behaviour-stable-as-tested", "finding",
          "That behaviour-level result holds across the tested seeds and paraphrase sets (the cells listed in the "
          "stability gate record), and only those.",
          _BEHAVIOUR_OK),
    Claim("sas-matches-dim", "finding",
          "At matched side-effect budgets, with each method's strength chosen on the selection split, SAS steering "
          "of refusal matches or beats DIM within the margin on the eval split in every compared kind (induce by "
          "addition, bypass by directional ablation): each comparison's CI lower bound is at or above -margin.",
          _BEHAVIOUR_OK, outcome="holds"),
    Claim("sas-falls-short-of-dim", "finding",
          "At matched side-effect budgets, with each method's strength chosen on the selection split, SAS steering "
          "of refusal falls short of DIM by more than the margin on the eval split in at least one compared kind "
          "(that comparison's CI upper bound is below -margin).",
          _BEHAVIOUR_OK, outcome="fails"),
    Claim("robustness-tested-families", "finding",
          "The behaviour-level result held in every declared paraphrase family, and is claimed for those families "
          "only: each is named in the stability gate record with how it was made and whether it was held out from "
          "the model's training and from selection.",
          _BEHAVIOUR_OK, every_paraphrase_family=True),
    Claim("robustness-unconstrained", "finding",
          "The behaviour-level result is robust to rewording without restriction to a tested subset.",
          _BEHAVIOUR_OK,
          never="never allowed: no finite set of tested paraphrase families can show robustness to every "
                "rewording; robustness-tested-families states what was tested"),
    Claim("reconstruction-adequate", "finding",
          "The SAEs reconstruct the model's activations within the preregistered nMSE threshold at every required "
          "tuple, so their latents are a validated basis for mechanism-level analysis.",
          (_on("reconstruction", "pass"),)),
    Claim("mechanism-sas-features", "finding",
          "Mechanism level: the SAE latents selected for SAS represent or encode refusal in the model "
          "(statements such as \"feature X encodes refusal\").",
          _MECHANISM_OK),
    Claim("causal-sas-features", "finding",
          "Causal: the selected SAE latents cause or mediate refusal, so steering them changes refusal through the "
          "features they represent.",
          _MECHANISM_OK),
    Claim("phase-advance", "finding",
          "Phase movement is authorized: the project may advance from behaviour-level to mechanism-level work.",
          (*_MECHANISM_OK, _on("remediation", "not_needed")), ),
    Claim("limitation-behaviour-invalid", "limitation",
          "The behaviour-level result is not decision-valid (a behaviour gate failed or is missing), so no claim "
          "about SAS versus DIM is made.",
          (_on("behaviour", "fail", ABSENT), _on("stability", "fail", ABSENT)), match="any"),
    Claim("limitation-reconstruction", "limitation",
          "The SAEs for the required tuples did not reach the reconstruction threshold, so their latents are not a "
          "validated basis for mechanism-level claims in this phase.",
          (_on("reconstruction", "fail"),)),
    Claim("limitation-remediation-stopped", "limitation",
          "A bounded search for alternative SAEs, under stop rules preregistered before it ran, stopped by rule "
          "without SAEs that pass the reconstruction gate on every required tuple.",
          (_on("remediation", "fail"),)),
    Claim("remediation-candidates-found", "limitation",
          "The preregistered search found alternative SAEs that pass the reconstruction gate on every required "
          "tuple; mechanism-level claims wait for a re-run of the pipeline with them.",
          (_on("remediation", "pass"),)),
)

BY_ID: dict[str, Claim] = {c.id: c for c in CATALOGUE}
FINDINGS: tuple[str, ...] = tuple(c.id for c in CATALOGUE if c.kind == "finding")
