"""One watcher poll: enumerate, match, compare with the state, decide the exit code, save the state.

The reopen condition: every required tuple is covered by an SAE not seen at lock time. "Lock
time" is the first poll of a state file (per source: the registry's first read, the Hub's
first read), so start the watcher when the path locks; that first poll records the baseline
and never claims a reopen. Exit 10 is returned once, on the poll where the condition becomes
met; later polls report it as still met and exit 0. A poll that cannot read the Hub raises
HubUnreachableError before anything is written.
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
from .descriptors import SaeDescriptor, Skipped
from .settings import WatchParams

REPORT_SCHEMA = "sasgate.watch_report/1"
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


def _enumerate(settings: WatchParams, prev: dict[str, Any], opts: PollOptions
               ) -> tuple[dict[str, list[SaeDescriptor | Skipped]], dict[str, Any]]:
    """Items per polled source, and the state's source records for this poll."""
    items: dict[str, list[SaeDescriptor | Skipped]] = {}
    sources: dict[str, Any] = {}
    if settings.registry or opts.registry_only:
        from .registry import read_registry

        found, skipped, version = read_registry()
        items["registry"] = [*found, *skipped]
        sources["registry"] = {"how": f"installed sae-lens registry (sae-lens {version})", "sae_lens": version}
    if not opts.registry_only:
        from .hub import read_hub

        hub = read_hub(settings, prev.get("hub", {}).get("repos", {}))
        items["hub"] = [*hub.descriptors, *hub.skipped]
        sources["hub"] = {"how": hub.how, "repos": hub.repos, "reread": hub.reread}
    return items, sources


def _fresh(report: CoverageReport, baseline: dict[str, set[str]], polled: set[str]) -> dict[str, list[str]]:
    """Per tuple, the covering SAEs of a polled source that were not seen at lock time."""
    return {t.tuple.key: [m.descriptor.id for m in t.matches if m.descriptor.source in polled
                          and m.descriptor.id not in baseline[m.descriptor.source]] for t in report.tuples}


def poll(req: Sequence[Required], settings: WatchParams, constraints: SaeConstraintParams, opts: PollOptions
         ) -> dict[str, Any]:
    """Run one poll under the state lock and return the report (its `exit_code` says 0 or 10)."""
    with st.locked(opts.state, settings.lock_timeout_s):
        prev = st.load(opts.state) or {}
        items, sources = _enumerate(settings, prev, opts)
        report = match(req, [i for src in items.values() for i in src], constraints)
        seen = {src: sorted({i.id for i in its if isinstance(i, SaeDescriptor)}) for src, its in items.items()}
        first = sorted(src for src in items if src not in prev.get("baseline", {}))
        baseline = {**{s: set(v) for s, v in prev.get("baseline", {}).items()}, **{s: set(seen[s]) for s in first}}
        prev_seen = {s: set(v) for s, v in prev.get("seen", {}).items()}
        new = sorted(i for src in items if src not in first for i in seen[src] if i not in prev_seen.get(src, set()))
        fresh = _fresh(report, baseline, set(items))
        met = all(fresh.values())
        same_tuples = prev.get("required") == [r.to_json() for r in req]
        was_met = bool(prev.get("reopen", {}).get("met")) and same_tuples
        newly = met and not was_met
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        exit_code = EXIT_REOPEN if newly else EXIT_NOTHING_NEW
        state = {
            "required": [r.to_json() for r in req],
            "baseline": {s: sorted(v) for s, v in sorted(baseline.items())},
            "seen": {**prev.get("seen", {}), **seen},
            "hub": {"repos": sources["hub"]["repos"]} if "hub" in sources else prev.get("hub", {"repos": {}}),
            "reopen": {"met": met, "since": (prev["reopen"]["since"] if was_met and met else now if met else None),
                       "notified": bool(prev.get("reopen", {}).get("notified")) and was_met and met},
            "polls": int(prev.get("polls", 0)) + 1,
            "last_poll": {"at": now, "sources": sorted(items), "exit_code": exit_code},
        }
        st.save(opts.state, state)
    return {
        "schema": REPORT_SCHEMA, "exit_code": exit_code, "at": now, "state": str(opts.state),
        "sources": {s: {k: v for k, v in info.items() if k != "repos"} | ({"repos": len(info["repos"])}
                    if "repos" in info else {}) for s, info in sources.items()},
        "baseline_recorded": first,
        "new_since_last_poll": new,
        "coverage": report.to_json(),
        "reopen": {"met": met, "newly_met": newly, "since": state["reopen"]["since"],
                   "notified": state["reopen"]["notified"], "fresh_covering": fresh},
    }


def mark_notified(path: Path, settings: WatchParams) -> None:
    """Record that the reopen notification went out (so a failed post is retried by the next poll)."""
    with st.locked(path, settings.lock_timeout_s):
        current = st.load(path)
        if current is not None and current["reopen"]["met"]:
            st.save(path, {**current, "reopen": {**current["reopen"], "notified": True}})
