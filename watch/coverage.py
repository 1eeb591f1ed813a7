"""The one coverage matcher: which SAEs cover which required (model, layer, site) tuple, k/N.

Shared by `sasgate watch` and the remediation stage, so the watcher's reopen claim and the
stop rules count coverage the same way. An SAE covers a tuple when it was trained on the
tuple's model family at the tuple's hook and meets `remediation.constraints`. Three rules are
written out, never implied:

* resid_pre[l] is resid_post[l-1] (transformer-lens: block l's input is block l-1's output), so
  an SAE at `blocks.{l-1}.hook_resid_post` covers (l, resid_pre) and the match says so;
* models are compared by identity (`sasgate.model_names`): names resolved through
  transformer-lens's alias table, owner included, so `gpt2-small` is `gpt2` and
  `someorg/gemma-2-2b-it` is not `google/gemma-2-2b-it` (an SAE of the same name under another
  owner is listed as excluded, never counted);
* an SAE trained on the base model (`gemma-2-2b`) does not cover a tuple naming the
  instruction-tuned one (`google/gemma-2-2b-it`) under `same_model_variant`; without it, it
  covers with a flag. Either way the report names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from sasgate.errors import HubUnreachableError
from sasgate.model_names import family_relation, resolve

from .descriptors import SaeDescriptor, Skipped

if TYPE_CHECKING:
    from sasgate.params import Params, RemediationFamilyParams, SaeConstraintParams
    from sasgate.paths import Paths

Unreachable = HubUnreachableError  # the Hub could not be read: never "0 candidates"


@dataclass(frozen=True)
class Required:
    """A required tuple; `key` is the params tuple key (`L1.resid_post`), `id` adds the resolved model."""

    model: str
    layer: int
    site: str

    @property
    def key(self) -> str:
        return f"L{self.layer}.{self.site}"

    @property
    def id(self) -> str:
        return f"{resolve(self.model).resolved}:{self.key}"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "layer": self.layer, "site": self.site}


@dataclass(frozen=True)
class Match:
    descriptor: SaeDescriptor
    how: str  # "same hook", or the resid_pre/resid_post identity it went through
    flags: tuple[str, ...] = ()  # what a reader should know (e.g. trained on the base model)


@dataclass
class TupleCoverage:
    tuple: Required
    matches: list[Match] = field(default_factory=list)
    excluded: list[tuple[SaeDescriptor, str]] = field(default_factory=list)  # right model and hook, a constraint fails


@dataclass
class CoverageReport:
    tuples: list[TupleCoverage]
    skipped: list[str]  # enumeration skips for the models asked about, then exclusions; sorted, with reasons

    def covering(self, tp: Required) -> list[SaeDescriptor]:
        return [m.descriptor for t in self.tuples if t.tuple.id == tp.id for m in t.matches]

    @property
    def covered(self) -> int:
        return sum(bool(t.matches) for t in self.tuples)

    @property
    def text(self) -> str:
        return f"{self.covered}/{len(self.tuples)}"

    def to_json(self) -> dict[str, Any]:
        return {"covered": self.covered, "required": len(self.tuples), "text": self.text, "skipped": self.skipped,
                "per_tuple": [{"tuple": t.tuple.to_json(), "key": t.tuple.key, "id": t.tuple.id,
                               "model_resolved": resolve(t.tuple.model).resolved,
                               "covering": [{"id": m.descriptor.id, "label": m.descriptor.label, "how": m.how,
                                             "flags": list(m.flags), "spec": m.descriptor.spec,
                                             "revision": m.descriptor.revision, "model": m.descriptor.model,
                                             "model_resolved": resolve(m.descriptor.model).resolved}
                                            for m in t.matches],
                               "excluded": [{"id": d.id, "label": d.label, "reason": r} for d, r in t.excluded]}
                              for t in self.tuples]}


def required(params: "Params") -> list[Required]:
    return [Required(params.model.name, t.layer, t.site) for t in params.tuples]


def _hook_relation(d: SaeDescriptor, r: Required) -> str | None:
    """How the SAE's hook is the tuple's, or None."""
    if d.layer is None or d.site is None:
        return None
    if (d.layer, d.site) == (r.layer, r.site):
        return "same hook"
    if r.site == "resid_pre" and d.site == "resid_post" and d.layer == r.layer - 1:
        return f"blocks.{d.layer}.hook_resid_post = blocks.{r.layer}.hook_resid_pre (resid_pre[l] = resid_post[l-1])"
    if r.site == "resid_post" and d.site == "resid_pre" and d.layer == r.layer + 1:
        return f"blocks.{d.layer}.hook_resid_pre = blocks.{r.layer}.hook_resid_post (resid_pre[l+1] = resid_post[l])"
    return None


def _failed_constraints(d: SaeDescriptor, r: Required, c: "SaeConstraintParams") -> tuple[list[str], list[str]]:
    """(reasons it does not cover, flags it covers with)."""
    fails, flags = [], []
    if c.architectures and d.architecture not in c.architectures:
        fails.append(f"architecture {d.architecture or 'unknown'} is not one of {c.architectures}")
    if c.min_width is not None and (d.width is None or d.width < c.min_width):
        fails.append(f"width {d.width or 'unknown'} is below min_width {c.min_width}")
    if c.max_width is not None and (d.width is None or d.width > c.max_width):
        fails.append(f"width {d.width or 'unknown'} is above max_width {c.max_width}")
    sae_model, tuple_model = resolve(d.model), resolve(r.model)
    if sae_model.variant != tuple_model.variant:
        text = (f"trained on the {sae_model.variant} model {sae_model}; the tuple names the {tuple_model.variant} "
                f"model {tuple_model}")
        (fails if c.same_model_variant else flags).append(text + (" (same_model_variant)" if c.same_model_variant
                                                                   else ""))
    return fails, flags


def match(req: Sequence[Required], descriptors: Iterable[SaeDescriptor | Skipped],
          constraints: "SaeConstraintParams") -> CoverageReport:
    """Per required tuple, the covering SAEs (sorted by id) and the near misses with the failed constraint.
    `descriptors` may hold the enumeration's `Skipped` entries too: those of the tuples' models are reported."""
    items = list(descriptors)
    descs = sorted((d for d in items if isinstance(d, SaeDescriptor)), key=lambda d: d.id)
    skips = [s for s in items if isinstance(s, Skipped)]
    out = []
    for r in req:
        tc = TupleCoverage(r)
        for d in descs:
            relation = family_relation(d.model, r.model)
            how = _hook_relation(d, r) if relation != "other" else None
            if how is None:
                continue
            if relation == "owner":
                tc.excluded.append((d, f"trained on {resolve(d.model)}, not {resolve(r.model)}: the same name under "
                                       "another owner is another model"))
                continue
            fails, flags = _failed_constraints(d, r, constraints)
            if fails:
                tc.excluded.append((d, "; ".join(fails)))
            else:
                tc.matches.append(Match(d, how, tuple(flags)))
        out.append(tc)
    excluded = sorted({f"{d.label}: not for {t.tuple.id}: {why}" for t in out for d, why in t.excluded})
    return CoverageReport(out, skipped_for(req, skips) + excluded)


def skipped_for(req: Sequence[Required], skips: Iterable[Skipped]) -> list[str]:
    """The skips a reader asking about these tuples needs: those of the same model family, or of no known model."""
    return sorted({str(s) for s in skips
                   if s.model is None or any(family_relation(s.model, r.model) == "same" for r in req)})


def descriptors_for(source: str, params: "Params", paths: "Paths", fam: "RemediationFamilyParams | None" = None
                    ) -> tuple[list[SaeDescriptor | Skipped], str]:
    """The SAEs one source offers (with its skips, which `match` reports) and how they were found.
    Raises Unreachable when the Hub cannot be read."""
    if source == "registry":
        from .registry import read_registry

        found, skipped, version = read_registry()
        return [*found, *skipped], f"installed sae-lens registry (sae-lens {version})"
    if source == "hub":
        from .hub import read_hub

        result = read_hub(params.watch, previous={})
        return [*result.descriptors, *result.skipped], result.how
    if fam is None or fam.dir is None:
        raise ValueError("a local family needs its dir")
    from .local import read_local

    found_local, skipped_local = read_local(paths.root, fam.dir)
    return [*found_local, *skipped_local], f"local SAE folders under {fam.dir}"
