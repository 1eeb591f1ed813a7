"""The short human report of one poll (the JSON report is the poll's dict itself)."""

from __future__ import annotations

from typing import Any

MAX_LISTED = 3  # covering SAEs named per tuple; --json has them all


def _tuple_line(t: dict[str, Any], fresh: list[str], name: str) -> str:
    cov = t["covering"]
    if not cov:
        ex = t["excluded"]
        why = f" ({len(ex)} excluded, e.g. {ex[0]['label']}: {ex[0]['reason']})" if ex else ""
        return f"  {name:<16} not covered{why}"
    names = []
    for c in cov[:MAX_LISTED]:
        via = "" if c["how"] == "same hook" else f" [{c['how']}]"
        flags = f" [{'; '.join(c['flags'])}]" if c["flags"] else ""
        names.append(f"{c['label']}{via}{flags}")
    more = f" and {len(cov) - MAX_LISTED} more" if len(cov) > MAX_LISTED else ""
    return (f"  {name:<16} covered by {len(cov)} ({len(fresh)} not seen at lock time): "
            f"{', '.join(names)}{more}")


def _resolved(per_tuple: list[dict[str, Any]]) -> list[str]:
    """Model names the report matched under another name (transformer-lens aliases)."""
    pairs = {(t["tuple"]["model"], t["model_resolved"]) for t in per_tuple}
    pairs |= {(c["model"], c["model_resolved"]) for t in per_tuple for c in t["covering"]}
    return sorted(f"{a} = {b}" for a, b in pairs if a != b)


def human(report: dict[str, Any]) -> str:
    cov, reopen = report["coverage"], report["reopen"]
    sources = " + ".join(report["sources"])
    if reopen["newly_met"]:
        verdict = "REOPEN CONDITION MET: every required tuple is covered by an SAE not seen at lock time"
        if reopen["since"] != report["at"]:
            verdict += f" (met since {reopen['since']}; no earlier report reached its caller)"
    elif reopen["met"]:
        verdict = f"reopen condition still met (since {reopen['since']})"
    else:
        verdict = "reopen condition not met"
    models = sorted({t["model_resolved"] for t in cov["per_tuple"]})
    lines = [f"sasgate watch: {cov['text']} required tuples of {', '.join(models)} covered ({sources}); {verdict}"]
    lines += [_tuple_line(t, reopen["fresh_covering"][t["id"]], t["key"] if len(models) == 1 else t["id"])
              for t in cov["per_tuple"]]
    if resolved := _resolved(cov["per_tuple"]):
        lines.append(f"model names resolved (transformer-lens aliases): {'; '.join(resolved)}")
    if report["baseline_recorded"]:
        lines.append(f"first poll of {', '.join(report['baseline_recorded'])}: what exists now is the lock-time "
                     "baseline")
    new = report["new_since_last_poll"]
    lines.append(f"new since the last poll: {len(new)} SAE(s)" + (f": {', '.join(new[:MAX_LISTED])}"
                                                                  + (" ..." if len(new) > MAX_LISTED else "")
                                                                  if new else ""))
    if "hub" in report["sources"]:
        hub = report["sources"]["hub"]
        refused = f", {len(hub['refused'])} refused (gated, disabled, private or gone: read again next poll)" \
            if hub["refused"] else ""
        lines.append(f"hub: {hub['repos']} repos listed, {len(hub['reread'])} read{refused}")
    if cov["skipped"]:
        lines.append(f"skipped or excluded: {len(cov['skipped'])} (reasons in --json)")
    if "evaluation" in report:
        ev = report["evaluation"]
        lines.append(f"evaluation: the reopened path would {'PASS' if ev['would_pass'] else 'not pass'} the "
                     f"reconstruction gate ({ev['summary']})")
    return "\n".join(lines)
