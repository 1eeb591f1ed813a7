"""One watcher poll: enumerate, match, compare with the state, decide the exit code, save the state.

The reopen condition: every required tuple is covered by an SAE not seen at lock time. "Lock
time" is the first poll of a state file (per source: the registry's first read, the Hub's
first read), so start the watcher when the path locks; that first poll records the baseline
and never claims a reopen. A poll that cannot read the Hub raises HubUnreachableError before
anything is written.

Reported once, never lost: the poll that finds the condition met saves it as not yet reported
and exits 10; the run marks it reported (`mark`) only once its report has reached the caller
and `--evaluate` has finished. Until then every poll exits 10 again; afterwards polls say
"still met" and exit 0. The caller holds the state lock (`state.locked`) for the whole run, so
two overlapping runs never both report it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from sasgate.errors import ParamsError
from sasgate.params import SaeConstraintParams

from . import state as st
from .coverage import CoverageReport, Required, match
from .descriptors import SaeDescriptor, Skipped, Source
from .settings import WatchParams
from .state import STATE_SCHEMA, HubState, LastPoll, Reopen, TupleRef, WatchState

REPORT_SCHEMA = "sasgate.watch_report/2"
EXIT_NOTHING_NEW, EXIT_REOPEN = 0, 10


@dataclass(frozen=True)
class PollOptions:
    state: Path
    registry_only: bool = False


def required_from_decision(path: str) -> list[Required]:
    """The tuples of a decision.json's SAE-coverage reopen condition."""
    from sasgate.decision import read_decision
    from sasgate.errors import ArtifactError

    try:
        decision = read_decision(path)
    except ArtifactError as exc:
        raise ParamsError(f"--decision: {exc}") from None
    conds = [c for c in decision.reopen_conditions if c.kind == "sae_coverage"]
    if not conds or not conds[0].required_tuples:
        raise ParamsError(f"{path}: decision_state {decision.decision_state} has no SAE-coverage reopen condition "
                          "to watch for")
    return [Required(t.model, t.layer, t.site) for t in conds[0].required_tuples]


def _enumerate(settings: WatchParams, prev: WatchState | None, opts: PollOptions
               ) -> tuple[dict[Source, list[SaeDescriptor | Skipped]], dict[str, Any]]:
    """Items per polled source, and the state's source records for this poll."""
    items: dict[Source, list[SaeDescriptor | Skipped]] = {}
    sources: dict[str, Any] = {}
    if settings.registry or opts.registry_only:
        from .registry import read_registry

        found, skipped, version = read_registry()
        items["registry"] = [*found, *skipped]
        sources["registry"] = {"how": f"installed sae-lens registry (sae-lens {version})", "sae_lens": version}
    if not opts.registry_only:
        from .hub import read_hub

        hub = read_hub(settings, prev.hub.repos if prev else {})
        items["hub"] = [*hub.descriptors, *hub.skipped]
        sources["hub"] = {"how": hub.how, "repos": hub.repos, "reread": hub.reread,
                          "refused": sorted(r for r, rec in hub.repos.items() if rec.retry)}
    return items, sources


def _fresh(report: CoverageReport, baseline: dict[Source, set[str]], polled: set[Source]) -> dict[str, list[str]]:
    """Per tuple (by id: model and key), the covering SAEs of a polled source that were not seen at lock time."""
    return {t.tuple.id: [m.descriptor.id for m in t.matches if m.descriptor.source in polled
                         and m.descriptor.id not in baseline[m.descriptor.source]] for t in report.tuples}


def _reopen(prev: WatchState | None, required: list[TupleRef], met: bool, now: str) -> Reopen:
    """The reopen record: what the previous poll knew carries over while the condition stays met
    for the same tuples; otherwise it starts again (not reported, not notified)."""
    if not met:
        return Reopen(met=False, since=None, reported=False, notified=False)
    if prev is not None and prev.required == required and prev.reopen.met:
        return prev.reopen
    return Reopen(met=True, since=now, reported=False, notified=False)


def poll(req: Sequence[Required], settings: WatchParams, constraints: SaeConstraintParams, opts: PollOptions
         ) -> dict[str, Any]:
    """Run one poll, save the state, and return the report (its `exit_code` says 0 or 10).
    The caller holds the state lock until the report has reached its reader (then `mark`)."""
    prev = st.load(opts.state)
    items, sources = _enumerate(settings, prev, opts)
    report = match(req, [i for src in items.values() for i in src], constraints)
    seen = {src: sorted({i.id for i in its if isinstance(i, SaeDescriptor)}) for src, its in items.items()}
    prev_baseline = prev.baseline if prev else {}
    first = sorted(src for src in items if src not in prev_baseline)
    baseline = {**{s: set(v) for s, v in prev_baseline.items()}, **{s: set(seen[s]) for s in first}}
    prev_seen = {s: set(v) for s, v in (prev.seen if prev else {}).items()}
    new = sorted(i for src in items if src not in first for i in seen[src] if i not in prev_seen.get(src, set()))
    fresh = _fresh(report, baseline, set(items))
    met = bool(fresh) and all(fresh.values())
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    required = [TupleRef.model_validate(r.to_json()) for r in req]
    reopen = _reopen(prev, required, met, now)
    due = met and not reopen.reported
    exit_code = EXIT_REOPEN if due else EXIT_NOTHING_NEW
    st.save(opts.state, WatchState(
        schema=STATE_SCHEMA, required=required,
        baseline={s: sorted(v) for s, v in sorted(baseline.items())},
        seen={**(prev.seen if prev else {}), **seen},
        hub=HubState(repos=sources["hub"]["repos"]) if "hub" in sources else (prev.hub if prev else
                                                                              HubState(repos={})),
        reopen=reopen, polls=(prev.polls if prev else 0) + 1,
        last_poll=LastPoll(at=now, sources=sorted(items), exit_code=exit_code)))
    return {
        "schema": REPORT_SCHEMA, "exit_code": exit_code, "at": now, "state": str(opts.state),
        "sources": {s: {k: v for k, v in info.items() if k != "repos"} | ({"repos": len(info["repos"])}
                    if "repos" in info else {}) for s, info in sources.items()},
        "baseline_recorded": first,
        "new_since_last_poll": new,
        "coverage": report.to_json(),
        "reopen": {"met": met, "newly_met": due, "since": reopen.since, "reported": reopen.reported,
                   "notified": reopen.notified, "fresh_covering": fresh},
    }


def mark(path: Path, *, reported: bool = False, notified: bool = False) -> None:
    """Record that this run's report reached its caller, or that its notification went out (the caller still
    holds the lock). Until then the next poll reports (or notifies) again: a reopen is never lost."""
    current = st.load(path)
    if current is not None and current.reopen.met:
        reopen = current.reopen.model_copy(update={"reported": current.reopen.reported or reported,
                                                   "notified": current.reopen.notified or notified})
        st.save(path, current.model_copy(update={"reopen": reopen}))
