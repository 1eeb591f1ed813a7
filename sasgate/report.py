"""`report.html`: one self-contained page of the decision, the gates, the claims and every plot.

Written from the records alone (decision.json, gates/*.json, the plots dvc.yaml declares and their
data, dvc.lock, preregistration/lock.json), never edited by hand, and byte-deterministic: no
timestamps, host, user or path, the same records give the same bytes on any machine. The charts
are SVG drawn by vl-convert (sasgate.plots) and inlined; the page holds no script and its
Content-Security-Policy allows none, loads nothing (`default-src 'none'`), so it opens offline, in
any browser, from a received bundle as from the workspace.

What is not a record stays out: the git commit and the environment would make a DVC output depend
on the checkout and the machine (and `archive verify --reproduce` could never be bit-exact); a
bundle records them (`_sasgate/bundle.json`, `_sasgate/environment.json`) and
`sasgate archive show BUNDLE --html OUT` renders this page with them, marked UNVERIFIED unless the
bundle verified. The dvc.lock digest covers every stage's lock entry but the report stage's own,
as dvc.lock held them when the page was written.

Records grow: fields this page does not know are shown generically rather than refused (a gate
record's top-level `comparisons` and `outcome`, a per-tuple `metrics` object and `criteria`,
decision.json's `preregistration`), while the fields it reads are validated by the same models
`decide` writes them with. Every string from a record is HTML-escaped (bidirectional and control
characters shown as escapes), so a hostile bundle cannot add markup or reorder what is shown.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pydantic import BaseModel

from .artifacts import atomic_write_text, canonical_json, sha256_bytes
from .claims import GATES
from .decision import STATE_TABLE, Decision, tuple_label, validate_decision
from .errors import ArtifactError, RecordConsistencyError
from .gates import GateRecord, TupleResult, validate_gate
from .plots import PlotError, Reader, count_marks, declared_plots, draw_svg, parse_json, parse_yaml, \
    renderer_versions, vega_lite_spec

STAGE = "report"
OUT = "report.html"
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_BIDI = re.compile("[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_GATE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_UNSAFE_SVG = re.compile(r"<\s*(script|foreignobject|iframe|object|embed)\b|<[^>]*(\son[a-z]+\s*=|javascript:)", re.I)
GATE_FIELDS_SHOWN = ("comparisons", "outcome")  # gate-record fields shown by name (issue 11), schema or not
ROW_FIELDS_SHOWN = ("metrics", "criteria")  # per-tuple fields shown by name (issue 15)
COMPARISON_COLUMNS = ("kind", "operator", "estimate", "ci", "margin", "outcome", "resampling_unit", "n_units",
                      "strength_chosen_on")


# --- reading the records ----------------------------------------------------------------------


def _split(raw: Mapping[str, Any], model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the fields `model` knows, the others): the known ones are validated, the others shown as they are."""
    names = {f.alias or n for n, f in model.model_fields.items()}
    return {k: v for k, v in raw.items() if k in names}, {k: v for k, v in raw.items() if k not in names}


@dataclass(frozen=True)
class GateView:
    record: GateRecord
    raw: dict[str, Any]  # the record as written: `comparisons`, `outcome` are read from here, known to GateRecord or not
    rows: list[dict[str, Any]]  # its per_tuple rows as written (`metrics`, `criteria`)
    extra: dict[str, Any]  # the other top-level fields GateRecord does not know


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    template: str
    sources: list[str]
    svg: str | None
    error: str | None
    marks: int


@dataclass
class Records:
    """Everything the page shows, read and checked once."""

    decision: Decision
    decision_raw: dict[str, Any]  # decision.json as written (`preregistration` is read from here)
    gates: dict[str, GateView]
    charts: list[Chart]
    lock_digest: str
    lock_stages: dict[str, str]
    digests: dict[str, str] = field(default_factory=dict)  # every file read -> sha256
    preregistration: dict[str, Any] | None = None
    compute: dict[str, Any] = field(default_factory=dict)  # what the stages recorded they ran with


class _Tracked:
    """The Reader handed to sasgate.plots, recording the sha256 of every file it gives out."""

    def __init__(self, read: Reader) -> None:
        self.inner, self.digests = read, {}

    def __call__(self, rel: str) -> bytes | None:
        data = self.inner(rel)
        if data is not None:
            self.digests[rel] = sha256_bytes(data)
        return data

    def require(self, rel: str, why: str) -> bytes:
        data = self(rel)
        if data is None:
            raise ArtifactError(f"missing {rel}: {why}")
        return data


def _object(data: bytes, origin: str) -> dict[str, Any]:
    try:
        raw = parse_json(data, origin)
    except PlotError as exc:
        raise ArtifactError(str(exc)) from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{origin}: expected a JSON object")
    return raw


def _gate(name: str, data: bytes, want_sha256: str | None) -> GateView:
    origin = f"gates/{name}.json"
    if want_sha256 is not None and sha256_bytes(data) != want_sha256:
        raise RecordConsistencyError(f"{origin} is not the record decision.json was made from (sha256 "
                                     f"{sha256_bytes(data)[:16]}..., decision.json names {want_sha256[:16]}...): "
                                     "re-run `decide` (`dvc repro`)")
    raw = _object(data, origin)
    known, extra = _split(raw, GateRecord)
    rows = known.get("per_tuple")
    if isinstance(rows, list):
        known["per_tuple"] = [_split(r, TupleResult)[0] if isinstance(r, dict) else r for r in rows]
    record = validate_gate(known, origin=origin)
    if record.gate != name:
        raise ArtifactError(f"{origin}: holds the {record.gate!r} gate")
    return GateView(record, raw, list(rows), {k: v for k, v in extra.items() if k not in GATE_FIELDS_SHOWN})


def lock_digest(data: bytes) -> tuple[str, dict[str, str]]:
    """sha256 of dvc.lock's entries of every stage but `report` (canonical JSON), and of each entry."""
    try:
        lock = parse_yaml(data, "dvc.lock")
    except PlotError as exc:
        raise ArtifactError(str(exc)) from None
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise ArtifactError("dvc.lock: no `stages` mapping: run `dvc repro` first")
    upstream = {name: entry for name, entry in stages.items() if name != STAGE}
    return (sha256_bytes(canonical_json(upstream).encode()),
            {name: sha256_bytes(canonical_json(entry).encode()) for name, entry in upstream.items()})


def _chart(index: int, plot: Any, read: Reader) -> Chart:
    title = str(plot.props.get("title") or plot.id)
    common = dict(id=f"plot-{index}", title=title, template=str(plot.props.get("template") or "linear"),
                  sources=plot.sources)
    try:
        svg = draw_svg(vega_lite_spec(plot, read), plot.id)
        if _UNSAFE_SVG.search(svg):
            raise PlotError(f"plot {plot.id}: the drawn SVG holds active content; not shown")
    except PlotError as exc:
        why = str(exc) if str(exc).startswith(f"plot {plot.id}: ") else f"plot {plot.id}: {exc}"
        return Chart(**common, svg=None, error=why, marks=0)
    marks = count_marks(f'<div id="c">{svg}</div>', ["c"])["c"]
    return Chart(**common, svg=svg, error=None if marks else f"plot {plot.id}: drew no marks", marks=marks)


def read_records(read: Reader) -> Records:
    """Read, validate and cross-check every record the page is written from (see the module docstring)."""
    src = _Tracked(read)
    raw = _object(src.require("decision.json", "run the pipeline (`dvc repro`) first"), "decision.json")
    known, _ = _split(raw, Decision)
    decision = validate_decision(known, origin="decision.json")
    if not 1 <= decision.state_row <= len(STATE_TABLE):
        raise ArtifactError(f"decision.json: state_row {decision.state_row} is not a row of the decision table")
    gates = {}
    for name, summary in decision.gates.items():
        if not _GATE_NAME.match(name):
            raise ArtifactError(f"decision.json: {name!r} is not a gate name")
        if summary.status == "absent":
            continue
        data = src.require(f"gates/{name}.json", f"decision.json says the {name} gate is {summary.status}")
        gates[name] = _gate(name, data, summary.sha256)
    dvc_yaml = src.require("dvc.yaml", "the plot declarations are read from it")
    try:
        plots = declared_plots(parse_yaml(dvc_yaml, "dvc.yaml"))
    except PlotError as exc:
        raise ArtifactError(str(exc)) from None
    charts = [_chart(i, p, src) for i, p in enumerate(plots, 1)]
    lock = read("dvc.lock")  # not listed by its file digest: that holds the report stage's own earlier entry
    if lock is None:
        raise ArtifactError("missing dvc.lock: run the pipeline (`dvc repro`) first")
    digest, per_stage = lock_digest(lock)
    prereg_raw = src("preregistration/lock.json")
    prereg = _object(prereg_raw, "preregistration/lock.json") if prereg_raw is not None else None
    return Records(decision, raw, gates, charts, digest, per_stage, src.digests, prereg, _compute(src))


def _compute(read: Reader) -> dict[str, Any]:
    """Device and dtype `collect` recorded (metrics/collect.json), the runtime params (params.yaml)."""
    out: dict[str, Any] = {}
    raw = read("metrics/collect.json")
    if raw is not None:
        with contextlib.suppress(ArtifactError):
            out["metrics/collect.json compute"] = _object(raw, "metrics/collect.json").get("compute")
    raw = read("params.yaml")
    if raw is not None:
        with contextlib.suppress(PlotError):
            params = parse_yaml(raw, "params.yaml")
            out["params.yaml runtime"] = params.get("runtime") if isinstance(params, dict) else None
    return out


# --- writing the page -------------------------------------------------------------------------


def esc(value: Any) -> str:
    """HTML-escaped text; control and bidirectional-override characters become visible \\u escapes."""
    text = value if isinstance(value, str) else str(value)
    return html.escape(_BIDI.sub(lambda m: f"\\u{ord(m.group()):04x}", text), quote=True)


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return esc(v)
    return esc(f"{v:.4g}") if isinstance(v, float) else esc(v)


def value(v: Any, depth: int = 0) -> str:
    """Any JSON value as compact escaped text (numbers to 4 significant digits)."""
    if v is None:
        return "—"
    if isinstance(v, (bool, int, float)):
        return esc(str(v).lower()) if isinstance(v, bool) else _num(v)
    if isinstance(v, str):
        return esc(v)
    if depth >= 4:
        return "…"
    if isinstance(v, list):
        if len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return f"[{_num(v[0])}, {_num(v[1])}]"
        return "[" + ", ".join(value(x, depth + 1) for x in v) + "]"
    if isinstance(v, dict):
        return "; ".join(f"{esc(k)}: {value(x, depth + 1)}" for k, x in v.items())
    return esc(repr(v))


def _badge(status: Any) -> str:
    s = str(status)
    kind = {"pass": "ok", "holds": "ok", "fail": "bad", "fails": "bad", "absent": "warn",
            "inconclusive": "warn"}.get(s, "muted")
    return f'<span class="badge {kind}">{esc(s)}</span>'


def _table(head: Sequence[str] | None, rows: Iterable[Sequence[str]], cls: str = "", mark: int | None = None) -> str:
    """A table; head is plain text (escaped here), cells are already HTML; row `mark` (0-based) highlighted."""
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if head is not None:
        out += ["<thead><tr>", *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead>"]
    out.append("<tbody>")
    for i, row in enumerate(rows):
        out.append(('<tr class="here">' if i == mark else "<tr>") + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _threshold(metric: Any, comparison: Any, threshold: Any) -> str:
    return "—" if threshold is None else f"{esc(metric)} {esc(comparison)} {_num(threshold)}"


def _decision_section(r: Records) -> str:
    d = r.decision
    rows = []
    for i, row in enumerate(STATE_TABLE, 1):
        here = i == d.state_row
        cells = [esc(i), esc(row.behaviour), esc(row.reconstruction), esc(row.remediation),
                 f"<code>{esc(row.active_path)}</code>", esc(str(row.phase_movement_authorized).lower()),
                 f"<code>{esc(row.decision_state)}</code>" + (' <strong class="here">◀ this decision</strong>'
                                                               if here else "")]
        rows.append(cells)
    table = _table(["row", "behaviour", "reconstruction", "remediation", "active_path",
                    "phase_movement_authorized", "decision_state"], rows, "decision-table", mark=d.state_row - 1)
    extra = []
    if d.stopped_by is not None:
        extra.append(f"<p>Remediation stopped by <strong>{esc(d.stopped_by.id)}</strong> "
                     f"({esc(d.stopped_by.kind)}): {esc(d.stopped_by.text)}</p>")
    if d.coverage:
        extra.append("<p>Candidate coverage: " + ", ".join(f"family {esc(f)} = {esc(t)}"
                                                             for f, t in d.coverage.items()) + "</p>")
    tuples = "; ".join(esc(tuple_label(t)) for t in d.required_tuples)
    return "\n".join([
        '<section id="decision">', "<h2>Decision</h2>",
        f'<p class="verdict">Decision state <code>{esc(d.decision_state)}</code>, active path '
        f"<code>{esc(d.active_path)}</code>, phase movement authorized: "
        f"<strong>{esc(str(d.phase_movement_authorized).lower())}</strong>: row {esc(d.state_row)} of the decision "
        "table (behaviour passes only when both the validity and the stability gate pass).</p>",
        table, *extra, f"<p>Required tuples: {tuples}.</p>", "</section>"])


def _per_tuple(view: GateView) -> str:
    rec = view.record
    if not rec.per_tuple:
        return ""
    rows = [r if isinstance(r, dict) else {} for r in view.rows]
    judged: list[str] = []  # the metrics a row's `criteria` names (strings, or objects with a `metric`)
    for row in rows:
        crit = row.get("criteria")
        for c in crit if isinstance(crit, list) else []:
            name = c if isinstance(c, str) else c.get("metric") if isinstance(c, dict) else None
            if isinstance(name, str) and name not in judged:
                judged.append(name)
    metrics = [r["metrics"] if isinstance(r.get("metrics"), dict) else {} for r in rows]
    metric_keys = [k for k in judged if any(k in m for m in metrics)]
    for m in metrics:
        metric_keys += [k for k in m if k not in metric_keys]
    known = {f.alias or n for n, f in TupleResult.model_fields.items()}
    others = sorted({k for r in rows for k in r if k not in known and k not in ROW_FIELDS_SHOWN})
    has_criteria = any("criteria" in r for r in rows)
    head = ["tuple", f"observed ({rec.metric})", "CI", "status"]
    head += [f"{k} (criterion)" if k in judged else k for k in metric_keys]
    head += (["criteria"] if has_criteria else []) + others
    out = []
    for t, row, m in zip(rec.per_tuple, rows, metrics):
        cells = [esc(tuple_label(t.tuple)), _num(t.observed) if t.observed is not None else "—",
                 value(list(t.ci95)) if t.ci95 is not None else "—", _badge(t.status)]
        cells += [(f"<strong>{value(m.get(k))}</strong>" if k in judged else value(m.get(k))) for k in metric_keys]
        cells += ([_criteria(row.get("criteria"))] if has_criteria else []) + [value(row.get(k)) for k in others]
        out.append(cells)
    return _table(head, out, "per-tuple")


def _criteria(crit: Any) -> str:
    """A row's judged criteria as `metric observed comparison threshold: pass|fail` (the reconstruction gate's
    objects); anything else as written."""
    if not isinstance(crit, list):
        return value(crit)
    out = []
    for c in crit:
        if isinstance(c, dict) and {"metric", "comparison", "threshold", "observed", "pass"} <= set(c):
            verdict = "pass" if c["pass"] is True else "fail"
            out.append(f"{esc(str(c['metric']))} {value(c['observed'])} {esc(str(c['comparison']))} "
                       f"{value(c['threshold'])}: {verdict}")
        else:
            out.append(value(c, 1))
    return "[" + ", ".join(out) + "]"


def _comparisons(view: GateView) -> str:
    comps = view.raw.get("comparisons")
    parts = []
    if "outcome" in view.raw:
        parts.append(f"<p>Outcome: {_badge(view.raw['outcome'])}</p>")
    if isinstance(comps, list) and comps:
        rows_in = [c if isinstance(c, dict) else {"value": c} for c in comps]
        present = [k for k in COMPARISON_COLUMNS if any(k in c for c in rows_in)]
        rest = [k for c in rows_in for k in c if k not in COMPARISON_COLUMNS]
        rest = list(dict.fromkeys(rest))
        rows = [[(_badge(c[k]) if k == "outcome" and k in c else value(c.get(k))) for k in present + rest]
                for c in rows_in]
        parts.append("<h4>Comparisons (effect(SAS) − effect(DIM))</h4>")
        parts.append(_table(present + rest, rows, "comparisons"))
    if view.extra:
        parts.append(_table(["field", "value"], [[esc(k), value(v)] for k, v in view.extra.items()], "extra"))
    return "\n".join(parts)


def _gates_section(r: Records) -> str:
    d = r.decision
    order = sorted(d.gates, key=lambda n: (GATES.index(n) if n in GATES else len(GATES), n))
    rows = [[esc(n), _badge(g.status), _num(g.key_figure) if g.key_figure is not None else "—",
             _threshold(g.metric, g.comparison, g.threshold), esc(g.reason or "—"),
             f"<code>{esc((g.sha256 or '—')[:16])}</code>"] for n, g in ((n, d.gates[n]) for n in order)]
    parts = ['<section id="gates">', "<h2>Gates</h2>",
             _table(["gate", "status", "key figure", "threshold", "reason", "record sha256"], rows, "gates")]
    for name in order:
        view = r.gates.get(name)
        if view is None:
            continue
        body = "\n".join(x for x in (_per_tuple(view), _comparisons(view)) if x)
        if body:
            parts += [f'<h3 id="gate-{esc(name)}">{esc(name)} {_badge(view.record.status)}</h3>',
                      f"<p>{esc(view.record.reason)}</p>", body]
    parts.append("</section>")
    return "\n".join(parts)


def _claims_section(r: Records) -> str:
    def rows(entries: Sequence[Any]) -> list[list[str]]:
        return [[f"<code>{esc(c.id)}</code>", esc(c.text), esc(", ".join(c.rests_on)), esc(c.because)]
                for c in entries] or [["(none)", "", "", ""]]

    head = ["claim", "statement", "rests on", "because"]
    return "\n".join(['<section id="claims">', "<h2>Claims</h2>", "<h3>We can claim</h3>",
                      _table(head, rows(r.decision.claims.allowed), "claims allowed"),
                      "<h3>We cannot claim</h3>", _table(head, rows(r.decision.claims.disallowed), "claims disallowed"),
                      "</section>"])


def _reopen_section(r: Records) -> str:
    items = [f"<li><strong>{esc(c.kind)}</strong>: {esc(c.text)}"
             + (f"<br>Required tuples: {'; '.join(esc(tuple_label(t)) for t in c.required_tuples)}."
                if c.required_tuples else "") + "</li>" for c in r.decision.reopen_conditions]
    body = "<ul>" + "".join(items) + "</ul>" if items else "<p>Nothing is closed: phase movement is authorized.</p>"
    return "\n".join(['<section id="reopen">', "<h2>What would reopen this work</h2>", body, "</section>"])


def _preregistration_section(r: Records) -> str:
    parts = []
    prereg = r.decision_raw.get("preregistration")
    if isinstance(prereg, dict):
        if prereg.get("preregistered_after_results") is True:
            parts.append('<p class="alarm">The protocol was preregistered <strong>after</strong> results it governs '
                         "(preregistered_after_results: true).</p>")
        parts.append(_table(["field", "value"], [[esc(k), value(v)] for k, v in prereg.items()], "preregistration"))
    elif prereg is not None:
        parts.append(f"<p>{value(prereg)}</p>")
    known = {f.alias or n for n, f in Decision.model_fields.items()}
    others = {k: v for k, v in r.decision_raw.items() if k not in known and k != "preregistration"}
    if others:
        parts.append("<h3>Other decision fields</h3>")
        parts.append(_table(["field", "value"], [[esc(k), value(v)] for k, v in others.items()], "extra"))
    if r.preregistration is not None:
        p = r.preregistration
        parts.append(f"<p>preregistration/lock.json: sha256 <code>{esc(p.get('sha256', '—'))}</code>, fixed at git "
                     f"commit <code>{esc(p.get('git_commit') or '—')}</code>, counts {value(p.get('counts'))}.</p>")
    if not parts:
        return ""
    return "\n".join(['<section id="preregistration">', "<h2>Preregistration</h2>", *parts, "</section>"])


def _plots_section(r: Records) -> str:
    parts = ['<section id="plots">', "<h2>Plots</h2>",
             f"<p>Every plot dvc.yaml declares ({len(r.charts)}), filled as <code>dvc plots show</code> fills it and "
             "drawn to SVG.</p>"]
    for c in r.charts:  # a drawn chart carries its own title
        title = f"<strong>{esc(c.title)}</strong><br>" if c.error else ""
        caption = f"<figcaption>{title}<small>{esc(', '.join(c.sources))} · template {esc(c.template)}</small></figcaption>"
        body = c.svg if c.svg is not None and c.marks else ""
        note = f'<p class="alarm">Not drawn: {esc(c.error)}</p>' if c.error else ""
        parts.append(f'<figure class="chart{" failed" if c.error else ""}" id="{c.id}" data-plot="{esc(c.sources[0])}">'
                     f"{caption}{note}{body}</figure>")
    parts.append("</section>")
    return "\n".join(parts)


def _provenance_section(r: Records, bundle: "BundleContext | None") -> str:
    versions = renderer_versions()
    rows = [["dvc.lock", f"sha256 <code>{esc(r.lock_digest)}</code> of the lock entries of "
                         f"{len(r.lock_stages)} stages (every stage but <code>{STAGE}</code>: canonical JSON)"],
            ["charts", esc(", ".join(f"{k} {v}" for k, v in versions.items()))]]
    rows.append(["computed with", "; ".join(f"{esc(k)}: {value(v)}" for k, v in r.compute.items()) or "not recorded"])
    if bundle is None:
        rows.append(["git commit, machine",
                     "not part of this page: it is a DVC output and may depend only on the records; a bundle records "
                     "both (<code>_sasgate/bundle.json</code>, <code>_sasgate/environment.json</code>) and "
                     "<code>sasgate archive show BUNDLE --html OUT</code> renders this page with them"])
    else:
        rows += bundle.provenance_rows()
    stages = _table(["stage", "lock entry sha256"], [[esc(n), f"<code>{esc(s[:16])}</code>"]
                                                     for n, s in r.lock_stages.items()], "stages")
    files = _table(["file", "sha256"], [[esc(n), f"<code>{esc(s)}</code>"] for n, s in sorted(r.digests.items())],
                   "files")
    return "\n".join(['<section id="provenance">', "<h2>Provenance</h2>", _table(None, rows, "provenance"),
                      "<h3>Records this page was written from</h3>", files, "<h3>dvc.lock entries</h3>", stages,
                      "</section>"])


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", sans-serif; color: #1b1e23;
       max-width: 1180px; margin: 0 auto; padding: 0 20px 40px; }
h1 { font-size: 1.6em; margin: 0.6em 0 0.2em; } h2 { border-bottom: 1px solid #ccd; padding-bottom: 3px; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #d6d8de; padding: 4px 7px; vertical-align: top; text-align: left; }
th { background: #f1f3f6; } tr.here td { background: #fff4c2; font-weight: 600; }
code { font: 0.9em ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-weight: 600; font-size: 0.9em; }
.ok { background: #d8f3dc; color: #14532d; } .bad { background: #fde2e1; color: #7f1d1d; }
.warn { background: #fff0c2; color: #713f12; } .muted { background: #e8eaee; color: #374151; }
.verdict { font-size: 1.1em; } .here { color: #92400e; }
.alarm { background: #fde2e1; border-left: 4px solid #b91c1c; padding: 6px 10px; }
#plots { display: flex; flex-wrap: wrap; gap: 18px; } #plots > h2, #plots > p { flex-basis: 100%; }
figure.chart { margin: 0; padding: 8px; border: 1px solid #d6d8de; border-radius: 6px; max-width: 100%; overflow-x: auto; }
figure.chart svg { display: block; max-width: 100%; height: auto; } figcaption { margin-bottom: 6px; }
.banner { position: sticky; top: 0; z-index: 10; padding: 10px 14px; margin: 0 -20px; font-weight: 600; }
.banner.unverified { background: #b91c1c; color: #fff; } .banner.verified { background: #166534; color: #fff; }
footer { margin-top: 2em; color: #555; font-size: 0.9em; }
""".strip()


@dataclass(frozen=True)
class BundleContext:
    """What a page rendered from a received bundle adds: whether it verified, and the bundle's own records."""

    name: str
    verified: bool
    verdict: str  # one line: how it verified, or why not / that it was not checked
    info: Mapping[str, Any] | None  # _sasgate/bundle.json, as found
    environment: Mapping[str, Any] | None  # _sasgate/environment.json, as found
    bundled_report: str  # whether the bundle's own report.html equals this page's rendering of its records

    def banner(self) -> str:
        label = "VERIFIED" if self.verified else "UNVERIFIED"
        tail = "" if self.verified else " Nothing on this page has been checked: run `sasgate archive verify` with " \
                                        "the signer's key before trusting any of it."
        return (f'<div class="banner {label.lower()}" id="verification">{label}: {esc(self.name)}: '
                f"{esc(self.verdict)}.{esc(tail)}</div>")

    def provenance_rows(self) -> list[list[str]]:
        mark = "" if self.verified else " (unverified)"
        info, env = self.info or {}, self.environment or {}
        git = info.get("git") if isinstance(info.get("git"), dict) else {}
        rows = [[f"bundle{mark}", f"{esc(self.name)}; its report.html: {esc(self.bundled_report)}"],
                [f"git commit{mark}", f"<code>{value(git.get('commit'))}</code> (dirty: {value(git.get('dirty'))})"],
                [f"signer{mark}", value(info.get("signer"))], [f"sasgate{mark}", value(info.get("sasgate_version"))]]
        if env:
            torch = env.get("torch") if isinstance(env.get("torch"), dict) else {}
            pkgs = env.get("packages") if isinstance(env.get("packages"), dict) else {}
            keep = ("torch", "transformer-lens", "sae-lens", "dvc", "numpy", "vl-convert-python", "sasgate")
            rows += [[f"environment{mark}", "; ".join([
                f"python {value((env.get('python') or {}).get('version') if isinstance(env.get('python'), dict) else None)}",
                f"OS {value(env.get('os'))}", f"CPU {value(env.get('cpu'))}",
                f"torch {value(torch.get('version'))} (CUDA build {value(torch.get('cuda_build'))}, GPUs "
                f"{value(torch.get('gpus'))})"])],
                [f"packages{mark}", value({k: pkgs[k] for k in keep if k in pkgs})]]
        else:
            rows.append([f"environment{mark}", "not in the bundle"])
        return rows


def render(records: Records, bundle: BundleContext | None = None) -> str:
    """The page: the same records (and bundle context) give the same text."""
    d = records.decision
    title = f"sasgate report: {d.decision_state} ({d.active_path})"
    failed = [c for c in records.charts if c.error]
    body = [
        bundle.banner() if bundle is not None else "",
        f"<header><h1>{esc(title)}</h1>",
        "<p>Written by <code>sasgate report</code> from the records below (decision.json, the gate records, the plots "
        "dvc.yaml declares, dvc.lock); never edited by hand. It loads nothing: it opens offline.</p>",
        (f'<p class="alarm">{len(failed)} of {len(records.charts)} plots could not be drawn (see Plots).</p>'
         if failed else ""), "</header>",
        _decision_section(records), _gates_section(records), _claims_section(records), _reopen_section(records),
        _preregistration_section(records), _plots_section(records), _provenance_section(records, bundle),
        "<footer>sasgate report · the same records give the same bytes · "
        "see README, \"Report\", and ARCHITECTURE.md, \"15. The report\"</footer>",
    ]
    head = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{esc(title)}</title>",
            f"<style>\n{STYLE}\n</style>", "</head>", "<body>"]
    return "\n".join(head + [b for b in body if b] + ["</body>", "</html>"]) + "\n"


def workspace_reader(root: Path) -> Reader:
    """A Reader over the project folder (project-relative posix paths; nothing outside it)."""
    base = root.resolve()

    def read(rel: str) -> bytes | None:
        p = (base / rel).resolve()
        if base not in p.parents or not p.is_file():
            return None
        return p.read_bytes()

    return read


def build(root: str | os.PathLike) -> tuple[Records, str]:
    """The project's records and the page they render to."""
    records = read_records(workspace_reader(Path(root)))
    return records, render(records)


def write_report(root: str | os.PathLike, out: str | os.PathLike | None = None) -> Records:
    """Render the project's report.html (or `out`) from its records, atomically; returns what it showed."""
    records, text = build(root)
    atomic_write_text(Path(out) if out is not None else Path(root) / OUT, text)
    return records
