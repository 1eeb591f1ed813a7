"""`remediation`: a bounded, preregistered search for alternative SAEs when the unlock failed.

Runs only when the reconstruction gate failed; otherwise it records `not_needed`. Then:

1. refuses (PreregistrationError, exit 8) without a preregistration, or when the stop rules or
   the protocol params changed after it, naming each difference (sasgate.preregistration);
2. enumerates candidate SAEs per preregistered family (params `remediation.families`: the
   installed sae-lens registry, a Hub search, or local SAE folders) and matches them to the
   required tuples with the watcher's coverage matcher, recording coverage k/N per family. A
   family that cannot be searched (Hub access off, HF_HUB_OFFLINE, network error) is recorded
   as "unavailable: hub unreachable (...)", never as 0 candidates;
3. applies the stop rules in their preregistered order before each evaluation and at the end
   (budget: K1, coverage: K2, exhausted: K3); evaluates candidates in a fixed order (family,
   tuple, candidate id) with the reconstruction gate's own measure (nMSE on the eval split,
   bootstrap CI) against its threshold, skipping tuples that already have a passing candidate;
4. writes gates/remediation.json: status `pass` (passing candidates for every failing tuple),
   `fail` (stopped; `details.stopped_by` names the rule) or `not_needed`.

Determinism: on the default params the Hub family is off (`remediation.hub_access: false`), so
the record is a pure function of its inputs and of the installed sae-lens registry. With Hub
access on, the record depends on what the Hub said; that is written down in the record
(family status and reason), and DVC cannot see it, so re-run remediation with `dvc repro -f
remediation` to poll again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Literal, Sequence

from sasgate import sae_io
from sasgate.activations import load_acts, load_token_index
from sasgate.artifacts import write_manifest
from sasgate.errors import ArtifactError, ParamsError, PreregistrationError
from sasgate.gates import GATE_SCHEMA, GateRecord, compare, input_digests, read_gate, write_gate
from sasgate.nmse import evaluate
from sasgate.params import Params, RemediationFamilyParams, TupleParams
from sasgate.paths import Paths
from sasgate.preregistration import StopRule, StopRules, load_stop_rules, verify
from sasgate.stage_runner import stage_main

GATE = "remediation"
SPLIT = "eval"
HUB_UNREACHABLE = "unavailable: hub unreachable"


@dataclass(frozen=True)
class Candidate:
    """A candidate SAE for one required tuple; `spec` is a params.tuples[].sae string that loads it,
    or None when the release offers no pinned, loadable form (then it is recorded, not evaluated)."""

    family: str
    tuple_key: str
    id: str
    spec: str | None


@dataclass(frozen=True)
class FamilyResult:
    """One family's enumeration: its covering candidates per tuple, or why it could not be searched."""

    available: bool
    reason: str  # how it was searched, or why it was not
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # descriptors that did not match, with the reason


@dataclass(frozen=True)
class Evaluation:
    status: Literal["pass", "fail", "error"]
    nmse: float | None = None
    ci: tuple[float, float] | None = None
    error: str | None = None


@dataclass
class SearchResult:
    stopped_by: StopRule | None
    evaluated: list[tuple[Candidate, Evaluation]]
    passing: dict[str, Candidate | None]


def _fires(rule: StopRule, keys: Sequence[str], candidates: Sequence[Candidate], remaining: Sequence[Candidate],
           n_evaluated: int) -> bool:
    if rule.kind == "budget":
        return n_evaluated >= rule.parameters["max_candidates"]
    if rule.kind == "coverage":
        return any(not any(c.tuple_key == k for c in candidates) for k in keys)
    return not remaining  # exhausted


def search(rules: StopRules, keys: Sequence[str], candidates: Sequence[Candidate],
           evaluate_one: Callable[[Candidate], Evaluation]) -> SearchResult:
    """Evaluate candidates in order until every tuple in `keys` has a passing one or a rule stops it.

    Before each evaluation the rules are checked in their preregistered order; the first that
    fires stops the search. A tuple with a passing candidate gets no further evaluations.
    """
    passing: dict[str, Candidate | None] = {k: None for k in keys}
    evaluated: list[tuple[Candidate, Evaluation]] = []
    done: set[Candidate] = set()
    while not all(passing.values()):
        remaining = [c for c in candidates if c not in done and passing.get(c.tuple_key) is None]
        fired = next((r for r in rules.rules if _fires(r, keys, candidates, remaining, len(evaluated))), None)
        if fired is not None:
            return SearchResult(fired, evaluated, passing)
        cand = remaining[0]  # an 'exhausted' rule (required by StopRules) fires before this runs dry
        result = evaluate_one(cand)
        done.add(cand)
        evaluated.append((cand, result))
        if result.status == "pass":
            passing[cand.tuple_key] = cand
    return SearchResult(None, evaluated, passing)


# --- enumeration ------------------------------------------------------------------------------


def _hub_blocked(params: Params) -> str | None:
    if not params.remediation.hub_access:
        return "remediation.hub_access is false: this run may not reach the Hub"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    return None


def enumerate_family(fam_id: str, fam: RemediationFamilyParams, params: Params, paths: Paths) -> FamilyResult:
    """The candidates one family offers for the required tuples (the watcher's coverage matcher decides)."""
    from sasgate.watch import coverage

    if fam.source == "hub":
        blocked = _hub_blocked(params)
        if blocked:
            return FamilyResult(False, f"{HUB_UNREACHABLE} ({blocked})")
    try:
        descriptors, how = coverage.descriptors_for(fam.source, params, paths, fam)
    except coverage.Unreachable as exc:
        return FamilyResult(False, f"{HUB_UNREACHABLE} ({exc})")
    req = coverage.required(params)
    report = coverage.match(req, descriptors, params.remediation.constraints)
    cands: dict[str, list[Candidate]] = {}
    for tp, r in zip(params.tuples, req):
        found = report.covering(r)
        cands[tp.key] = sorted((Candidate(fam_id, tp.key, d.label, d.spec) for d in found), key=lambda c: c.id)
    return FamilyResult(True, how, cands, report.skipped)


# --- evaluation -------------------------------------------------------------------------------


class Evaluator:
    """nMSE of a candidate SAE on the eval split, exactly as the reconstruction gate measures it.
    The eval activations are read on the first evaluation (a search stopped by K2 reads none)."""

    def __init__(self, params: Params, paths: Paths):
        self.params, self.paths = params, paths
        self.tuples = {tp.key: tp for tp in params.tuples}

    @cached_property
    def _tokens(self) -> tuple[Any, Any]:
        index = load_token_index(self.paths, SPLIT)
        keep = ~index["is_bos"]
        return keep, index["prompt_index"][keep]

    def __call__(self, cand: Candidate) -> Evaluation:
        rp, base = self.params.reconstruction, self.tuples[cand.tuple_key]
        if cand.spec is None:
            return Evaluation("error", error=f"{cand.id}: no loadable form (needs a pinned commit and the "
                                             "sae-lens disk layout); not evaluated")
        tp = TupleParams(layer=base.layer, site=base.site, sae=cand.spec)
        try:
            sae, _origin = sae_io.fetch_for_tuple(self.params, self.paths, tp, device=self.params.runtime.device)
            sae_io.check_sae_fits(sae, tp, sae_io.model_d_model(self.params, self.paths), self.params.model.name)
        except (ArtifactError, ParamsError) as exc:
            return Evaluation("error", error=str(exc))
        keep, prompt_index = self._tokens
        acts = load_acts(self.paths, SPLIT, tp.key)[keep]
        res = evaluate(sae, acts, prompt_index, rp.bootstrap_samples, rp.bootstrap_seed, rp.ci_level)
        ok = compare(res.nmse, rp.comparison, rp.threshold)
        return Evaluation("pass" if ok else "fail", res.nmse, tuple(res.ci))


# --- the record -------------------------------------------------------------------------------


def _coverage_json(results: dict[str, FamilyResult], keys: Sequence[str]) -> dict[str, Any]:
    """Coverage k/N per family over every required tuple (as the watcher counts it)."""
    out = {}
    for fam, r in results.items():
        covered = sum(bool(r.candidates.get(k)) for k in keys) if r.available else None
        out[fam] = {"available": r.available, "covered": covered, "required": len(keys),
                    "text": f"{covered}/{len(keys)}" if r.available else r.reason, "how": r.reason,
                    "per_tuple": {k: [c.id for c in r.candidates.get(k, [])] for k in keys},
                    "skipped": r.skipped}
    return out


def _tuple_ref(params: Params, tp: TupleParams) -> dict[str, Any]:
    return {"model": params.model.name, "layer": tp.layer, "site": tp.site}


def _not_needed(params: Params, paths: Paths, recon: GateRecord) -> dict[str, Any]:
    return {
        "schema": GATE_SCHEMA, "gate": GATE, "status": "not_needed", "metric": recon.metric,
        "threshold": recon.threshold, "comparison": recon.comparison,
        "per_tuple": [{"tuple": _tuple_ref(params, tp), "observed": None, "ci95": None, "status": "not_needed"}
                      for tp in params.tuples],
        "inputs": input_digests(paths.root, [paths.gate("reconstruction")]),
        "params": params.section("remediation"),
        "reason": "the reconstruction gate passed: no remediation needed",
        "details": None,
    }


def _per_tuple(params: Params, failing: set[str], found: SearchResult) -> list[dict[str, Any]]:
    rows = []
    for tp in params.tuples:
        if tp.key not in failing:
            rows.append({"tuple": _tuple_ref(params, tp), "observed": None, "ci95": None, "status": "not_needed",
                         "extra": {"key": tp.key, "note": "passed the reconstruction gate"}})
            continue
        evals = [(c, e) for c, e in found.evaluated if c.tuple_key == tp.key and e.nmse is not None]
        best = min(evals, key=lambda ce: ce[1].nmse) if evals else None
        winner = found.passing.get(tp.key)
        rows.append({"tuple": _tuple_ref(params, tp), "observed": best[1].nmse if best else None,
                     "ci95": list(best[1].ci) if best and best[1].ci else None,
                     "status": "pass" if winner else "fail",
                     "extra": {"key": tp.key, "best_candidate": best[0].id if best else None,
                               "passing_candidate": winner.spec if winner else None}})
    return rows


def _reason(stopped: StopRule | None, coverage: dict[str, Any], n_eval: int, failing: Sequence[str]) -> str:
    cov = ", ".join(f"{f} = {c['text']}" for f, c in coverage.items())
    if stopped is None:
        return (f"passing candidates found for {len(failing)}/{len(failing)} failing tuples after {n_eval} "
                f"evaluations ({cov}); re-run the pipeline with them")
    return f"stopped by {stopped.id} ({stopped.kind}) after {n_eval} evaluations ({cov})"


def run(params: Params, paths: Paths) -> dict[str, Any]:
    recon = read_gate(paths.gate("reconstruction"), gate="reconstruction")
    if recon.status == "pass":
        record = _not_needed(params, paths, recon)
    else:
        lock = verify(params, paths)
        rules = load_stop_rules(paths.stop_rules)
        record = _remediate(params, paths, recon, rules, lock)
    write_gate(paths.gate(GATE), record)
    write_manifest(paths.manifest(GATE), GATE, [paths.gate(GATE)], paths.root)
    return record


def _remediate(params: Params, paths: Paths, recon: GateRecord, rules: StopRules, lock: dict[str, Any]
               ) -> dict[str, Any]:
    declared = [f.id for f in rules.families]
    if sorted(declared) != sorted(params.remediation.families):
        raise PreregistrationError(
            f"params remediation.families {sorted(params.remediation.families)} are not the preregistered families "
            f"{declared} of {paths.rel(paths.stop_rules)}")
    failing_refs = {(t.tuple.layer, t.tuple.site) for t in recon.per_tuple if t.status == "fail"}
    failing = [tp.key for tp in params.tuples if (tp.layer, tp.site) in failing_refs]
    results = {f: enumerate_family(f, params.remediation.families[f], params, paths) for f in declared}
    candidates = [c for f in declared for k in failing for c in results[f].candidates.get(k, [])]  # failing only
    found = search(rules, failing, candidates, Evaluator(params, paths))
    coverage = _coverage_json(results, [tp.key for tp in params.tuples])
    stopped, budget = found.stopped_by, rules.rule("budget")
    return {
        "schema": GATE_SCHEMA, "gate": GATE, "status": "fail" if stopped else "pass", "metric": recon.metric,
        "threshold": recon.threshold, "comparison": recon.comparison,
        "per_tuple": _per_tuple(params, set(failing), found),
        "inputs": input_digests(paths.root, [paths.gate("reconstruction"), paths.stop_rules]),
        "params": params.section("remediation"),
        "reason": _reason(stopped, coverage, len(found.evaluated), failing),
        "details": {
            "stopped_by": {"id": stopped.id, "kind": stopped.kind, "text": stopped.stated} if stopped else None,
            "coverage": coverage,
            "rules": [{"id": r.id, "kind": r.kind, "text": r.stated, "parameters": r.parameters} for r in rules.rules],
            "evaluated": [{"family": c.family, "tuple": c.tuple_key, "candidate": c.id, "spec": c.spec,
                           "status": e.status, "nmse": e.nmse, "ci": list(e.ci) if e.ci else None, "error": e.error}
                          for c, e in found.evaluated],
            "budget": {"max_candidates": budget.parameters["max_candidates"] if budget else None,
                       "used": len(found.evaluated)},
            "preregistration": {"sha256": lock["sha256"], "git_commit": lock.get("git_commit"),
                                "made_after": lock.get("made_after", {})},
        },
    }


if __name__ == "__main__":
    stage_main(GATE, run)
