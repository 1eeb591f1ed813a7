"""report.html from constructed records: what it shows, that it follows the records, and that it fails closed.

No `dvc repro` here: the records are built with the real schemas (gate_records, sasgate.decision.decide),
the plot declarations are the repository's dvc.yaml, the templates its .dvc/plots. The page opened in a
real browser is tests/test_report_browser.py.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gate_records import TUPLES, behaviour, gate, reconstruction, remediation, stability
from sasgate.artifacts import atomic_write_json, canonical_json, sha256_file
from sasgate.cli import main
from sasgate.decision import STATE_TABLE, decide, write_decision
from sasgate.errors import ArtifactError, RecordConsistencyError
from sasgate.gates import write_gate
from sasgate.plots import count_marks, declared_plots
from sasgate.report import lock_digest, read_records, render, workspace_reader, write_report

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())

PLOT_ROWS = {
    "plots/steering_induce.json": [{"method": m, "strength": c, "rate": r, "lo": max(0.0, r - 0.05),
                                    "hi": min(1.0, r + 0.05), "chosen_on_selection": int(c == 0.5)}
                                   for m, rs in (("DIM addition", (0.0, 0.79, 0.97)), ("SAS addition", (0.0, 0.01, 0.02)))
                                   for c, r in zip((0.0, 0.5, 1.0), rs)],
    "plots/steering_bypass.json": [{"method": m, "strength": c, "rate": r, "lo": max(0.0, r - 0.05),
                                    "hi": min(1.0, r + 0.05), "chosen_on_selection": int(c == 1.0)}
                                   for m, rs in (("DIM directional ablation", (0.998, 0.5, 0.196)),
                                                 ("SAS directional ablation", (0.998, 0.7, 0.46)))
                                   for c, r in zip((0.0, 0.5, 1.0), rs)],
    "plots/side_effects.json": [{"setting": f"{i} {c}", "side_effect": k, "text": "harmless", "chosen_on_selection": 0}
                                for i, c, k in (("dim_ablate", 0.5, 0.02), ("dim_add", 1.0, 0.4), ("sas_add", 1.0, 0.1))],
    "plots/scorer_agreement.json": [{"version": "v1", "agreement": 0.492}, {"version": "v2", "agreement": 0.994}],
    "plots/stability.json": [{"cell": f"seed {s} / paraphrase set {p}", "sas_minus_dim": -0.7 - 0.01 * s,
                              "holds": 0, "agrees": 1} for s in (0, 1) for p in (0, 1)],
    "plots/reconstruction.json": [{"required_tuple": "L0.resid_pre", "nmse": 0.163, "lo": 0.158, "hi": 0.169,
                                   "threshold": 0.12, "status": "fail"},
                                  {"required_tuple": "L1.resid_post", "nmse": 0.195, "lo": 0.19, "hi": 0.2,
                                   "threshold": 0.12, "status": "fail"}],
}
RECORDS = {
    4: {"behaviour": behaviour(), "stability": stability(), "reconstruction": reconstruction(0.163, 0.195),
        "remediation": remediation("stopped")},
    2: {"behaviour": behaviour(), "stability": stability(), "reconstruction": reconstruction(0.05, 0.08),
        "remediation": remediation("not_needed")},
    1: {"behaviour": behaviour("fail"), "stability": None, "reconstruction": reconstruction(0.05, 0.08),
        "remediation": remediation("not_needed")},
}


def make_project(root: Path, row: int = 4, records: dict | None = None) -> Path:
    """A project folder holding the records `decide` and the plot stages write (no pipeline run)."""
    recs = records or RECORDS[row]
    for name, rec in recs.items():
        if rec is not None:
            write_gate(root / "gates" / f"{name}.json", rec)
    write_decision(root / "decision.json", decide(recs, TUPLES))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    shutil.copytree(REPO / "preregistration", root / "preregistration")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for rel, rows in PLOT_ROWS.items():
        atomic_write_json(root / rel, rows)
    lock = {"schema": "2.0", "stages": {s: {"cmd": f"python -m sasgate.stages.{s}", "outs": [{"path": s, "md5": "0"}]}
                                        for s in DVC_YAML["stages"]}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return root


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "p")


class _Page(HTMLParser):
    """The page's tables (section id -> list of (classes, rows of cell text, marked row index)) and figures."""

    def __init__(self) -> None:
        super().__init__()
        self.section, self.tables, self.figures, self.cell, self.row, self.rows = None, [], {}, None, None, None
        self.row_class, self.marked, self.texts = None, None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
        elif tag == "table":
            self.rows, self.marked, self.table_class = [], None, a.get("class", "")
        elif tag == "tr" and self.rows is not None:
            self.row = []
            if a.get("class") == "here":
                self.marked = len(self.rows)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []
        elif tag == "figure":
            self.figures[a["id"]] = a

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.rows.append(self.row)
            self.row = None
        elif tag == "table" and self.rows is not None:
            self.tables.append((self.section, self.table_class, self.rows, self.marked))
            self.rows = None

    def handle_data(self, data):
        self.texts.append(data)
        if self.cell is not None:
            self.cell.append(data)

    def table(self, cls: str) -> tuple[list[list[str]], int | None]:
        found = [(rows, marked) for _, c, rows, marked in self.tables if cls in c.split()]
        assert len(found) == 1, (cls, [c for _, c, _, _ in self.tables])
        return found[0]


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


# --- what the page shows -------------------------------------------------------------------------


@pytest.mark.parametrize("row", [4, 2, 1])
def test_the_page_shows_the_decision_its_row_gates_claims_and_reopen_conditions(tmp_path, row):
    root = make_project(tmp_path / "p", row)
    write_report(root)
    text = (root / "report.html").read_text()
    decision = json.loads((root / "decision.json").read_text())
    assert decision["state_row"] == row
    page = parse(text)
    table, marked = page.table("decision-table")
    assert marked == row and table[marked][0] == str(row)  # the header is row 0 of the table
    assert f"sasgate report: {decision['decision_state']} ({decision['active_path']})" in text
    assert table[marked][4] == decision["active_path"] == STATE_TABLE[row - 1].active_path
    assert table[marked][6].startswith(decision["decision_state"]) and "this decision" in table[marked][6]
    gates, _ = page.table("gates")
    assert {r[0]: r[1] for r in gates[1:]} == {g: s["status"] for g, s in decision["gates"].items()}
    for r in gates[1:]:
        g = decision["gates"][r[0]]
        assert r[4] == (g["reason"] or "—") and r[5] == (g["sha256"] or "—")[:16]
        if g["threshold"] is not None:
            assert r[3] == f"{g['metric']} {g['comparison']} {g['threshold']:.4g}"
    allowed, _ = page.table("allowed")
    disallowed, _ = page.table("disallowed")
    assert [r[0] for r in allowed[1:]] == [c["id"] for c in decision["claims"]["allowed"]] or \
        (not decision["claims"]["allowed"] and allowed[1][0] == "(none)")
    assert [r[0] for r in disallowed[1:]] == [c["id"] for c in decision["claims"]["disallowed"]]
    for entry, shown in zip(decision["claims"]["disallowed"], disallowed[1:]):
        assert shown[2] == ", ".join(entry["rests_on"]) and shown[3] == entry["because"]
    reopen = text.split('<section id="reopen">')[1].split("</section>")[0]
    assert reopen.count("<li>") == len(decision["reopen_conditions"])
    for cond in decision["reopen_conditions"]:
        assert f"<strong>{cond['kind']}</strong>" in reopen


def test_the_page_draws_every_declared_plot_and_names_its_provenance(project):
    records = write_report(project)
    text = (project / "report.html").read_text()
    page = parse(text)
    declared = declared_plots(DVC_YAML)
    assert [f["data-plot"] for f in page.figures.values()] == [p.sources[0] for p in declared]
    marks = count_marks(text, page.figures)
    drawn = {page.figures[i]["data-plot"]: n for i, n in marks.items()}
    # bars: one per row; steering curves: a CI band and a line per method, and a point per row
    assert drawn["plots/side_effects.json"] == 3 and drawn["plots/stability.json"] == 4
    assert drawn["plots/reconstruction.json"] == 2 + 2 + 1  # per tuple a CI rule and a point; the threshold rule
    assert drawn["plots/steering_induce.json"] == 2 + 2 + len(PLOT_ROWS["plots/steering_induce.json"])
    digest, stages = lock_digest((project / "dvc.lock").read_bytes())
    assert records.lock_digest == digest and digest in text and "report" not in stages
    files, _ = page.table("files")
    listed = {r[0]: r[1] for r in files[1:]}
    for rel in ["decision.json", "dvc.yaml", *PLOT_ROWS, *(f"gates/{g}.json" for g in RECORDS[4])]:
        assert listed[rel] == sha256_file(project / rel), rel
    assert "dvc.lock" not in listed  # its file holds the report stage's own earlier entry: only the digest is shown
    runtime = yaml.safe_load((REPO / "params.yaml").read_text())["runtime"]
    assert "params.yaml runtime: " + "; ".join(f"{k}: {v}" for k, v in runtime.items()) in " ".join(text.split())
    assert stage_params(DVC_YAML["stages"]["report"]) == ["runtime"]  # so DVC re-renders when it changes


def stage_params(stage: dict) -> list[str]:
    return [p for p in stage.get("params", []) if isinstance(p, str)]


def test_same_records_give_the_same_bytes_and_any_change_shows(project, tmp_path):
    write_report(project, tmp_path / "a.html")
    write_report(project, tmp_path / "b.html")
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()
    rows = PLOT_ROWS["plots/stability.json"]
    atomic_write_json(project / "plots/stability.json", [dict(rows[0], sas_minus_dim=0.3), *rows[1:]])
    write_report(project, tmp_path / "c.html")
    assert (tmp_path / "c.html").read_bytes() != (tmp_path / "a.html").read_bytes()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    lock["stages"]["report"] = {"cmd": "its own entry: not part of the digest"}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    write_report(project, tmp_path / "d.html")
    assert (tmp_path / "d.html").read_bytes() == (tmp_path / "c.html").read_bytes()
    lock["stages"]["decide"]["cmd"] = "python -m sasgate.stages.decide --changed"
    (project / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    write_report(project, tmp_path / "e.html")
    assert (tmp_path / "e.html").read_bytes() != (tmp_path / "d.html").read_bytes()


def test_the_page_loads_nothing_and_holds_no_script(project):
    write_report(project)
    text = (project / "report.html").read_text()
    assert "Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\"" in text
    # url(#clip1): an SVG clip path by its id in the same page, which loads nothing; any other url( would
    assert not re.search(r"<script|<link|<iframe|<img|\ssrc=|\shref=|url\((?!#clip\d+\))|@import", text, re.I)
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text)  # no timestamp
    assert str(project) not in text and "/tmp" not in text  # no absolute path


# --- records that grow -------------------------------------------------------------------------------


def _rewrite(root: Path, name: str, raw: dict) -> None:
    """A gate record carrying fields this branch's GateRecord does not know yet, with decision.json naming its
    sha256 (as `decide` does once the schema has them)."""
    path = root / "gates" / f"{name}.json"
    path.write_text(canonical_json(raw))
    decision = json.loads((root / "decision.json").read_text())
    decision["gates"][name]["sha256"] = sha256_file(path)
    (root / "decision.json").write_text(canonical_json(decision))


def test_comparisons_metrics_criteria_and_preregistration_are_rendered_when_present(project):
    recs = dict(RECORDS[4], behaviour=behaviour(cis=((-0.8, -0.73), (-0.15, 0.04))))
    write_gate(project / "gates" / "behaviour.json", recs["behaviour"])
    write_decision(project / "decision.json", decide(recs, TUPLES))
    rec = reconstruction(0.163, 0.195).to_json()
    for i, row in enumerate(rec["per_tuple"]):
        row["metrics"] = {"nmse": row["observed"], "ce_loss_score": 0.91 + i / 100, "kl_div_score": 0.97,
                          "dead_latents": 12 + i}
        row["criteria"] = [{"metric": "nmse", "comparison": "<=", "threshold": 0.12, "observed": row["observed"],
                            "pass": False},
                           {"metric": "kl_div_score", "comparison": ">=", "threshold": 0.99, "observed": 0.97,
                            "pass": False}]
    _rewrite(project, "reconstruction", rec)
    decision = json.loads((project / "decision.json").read_text())
    decision["preregistration"] = {"preregistered_after_results": True, "lock_sha256": "ab" * 32,
                                   "preceding_records": [{"gate": "reconstruction", "sha256": "cd" * 32,
                                                          "status": "fail", "in_dvc_lock": False}]}
    (project / "decision.json").write_text(canonical_json(decision))

    write_report(project)
    text = (project / "report.html").read_text()
    page = parse(text)
    comps, _ = page.table("comparisons")
    assert comps[0][:9] == ["kind", "operator", "estimate", "ci", "margin", "outcome", "resampling_unit", "n_units",
                            "strength_chosen_on"] and comps[0][9] == "arms"  # then the other keys, as written (sorted)
    assert comps[1][:6] == ["induce", "addition", "-0.765", "[-0.8, -0.73]", "0.1", "fails"]
    assert comps[2][5] == "inconclusive" and "sas_ablate" in comps[2][9]
    assert "Outcome: fails" in " ".join(" ".join(page.texts).split())
    recon = [rows for sec, cls, rows, _ in page.tables if "per-tuple" in cls.split() and rows[0][1] == "observed (nmse)"]
    head, first = recon[0][0], recon[0][1]
    assert head[4:] == ["nmse (criterion)", "kl_div_score (criterion)", "ce_loss_score", "dead_latents", "criteria"]
    assert first[4:] == ["0.163", "0.97", "0.91", "12", "[nmse 0.163 <= 0.12: fail, kl_div_score 0.97 >= 0.99: fail]"]
    assert "preregistered <strong>after</strong> results" in text
    prereg, _ = page.table("preregistration")
    assert ["preregistered_after_results", "true"] in prereg


def test_a_preregistration_made_before_results_raises_no_alarm(project):
    decision = json.loads((project / "decision.json").read_text())
    decision["preregistration"] = {"preregistered_after_results": False, "lock_sha256": "ab" * 32,
                                   "preceding_records": []}
    (project / "decision.json").write_text(canonical_json(decision))
    write_report(project)
    text = (project / "report.html").read_text()
    assert "preregistered <strong>after</strong>" not in text and "preregistered_after_results" in text


# --- fail closed ----------------------------------------------------------------------------------


@pytest.mark.parametrize("remove, named", [
    ("decision.json", "missing decision.json"),
    ("gates/stability.json", "missing gates/stability.json: decision.json says the stability gate is pass"),
    ("dvc.yaml", "missing dvc.yaml"),
    ("dvc.lock", "missing dvc.lock"),
])
def test_a_missing_record_is_an_error_naming_it_and_writes_nothing(project, tmp_path, remove, named):
    (project / remove).unlink()
    with pytest.raises(ArtifactError, match=re.escape(named)):
        write_report(project, tmp_path / "out.html")
    assert not (tmp_path / "out.html").exists()


def test_a_gate_record_changed_after_the_decision_is_refused(project):
    write_gate(project / "gates" / "stability.json", gate("stability", "fail", metric="cell_agreement",
                                                          threshold=0.8, comparison=">="))
    with pytest.raises(RecordConsistencyError, match="gates/stability.json is not the record decision.json was made"):
        write_report(project)
    assert RecordConsistencyError.exit_code == 11


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(schema="sasgate.decision/0"), "not a sasgate.decision/1 decision"),
    (lambda d: d.update(state_row=9), "state_row 9 is not a row of the decision table"),
    (lambda d: d["gates"]["behaviour"].update(status="maybe"), "invalid decision"),
    (lambda d: d["gates"].update({"../decision": d["gates"]["behaviour"]}), "'../decision' is not a gate name"),
])
def test_an_invalid_decision_is_refused(project, edit, match):
    decision = json.loads((project / "decision.json").read_text())
    edit(decision)
    (project / "decision.json").write_text(json.dumps(decision))
    with pytest.raises(ArtifactError, match=match):
        write_report(project)


def _template(project: Path, name: str, content: dict) -> None:
    (project / ".dvc" / "plots" / f"{name}.json").write_text(json.dumps(content))
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["plots"][0]["plots/steering_induce.json"]["template"] = name
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


BASE = json.loads((REPO / ".dvc" / "plots" / "ci_band.json").read_text())


@pytest.mark.parametrize("content, why", [
    (BASE | {"data": {"url": "file:///etc/passwd"}}, "its data must be"),
    (BASE | {"layer": [BASE["layer"][0] | {"data": {"url": "https://example.org/x.json"}}]}, "'data' is not allowed"),
    (BASE | {"encoding": BASE["encoding"] | {"href": {"field": "method"}}}, "'href' is not allowed"),
    (BASE | {"transform": [{"lookup": "method", "from": {"data": {"values": []}, "key": "m"}}]}, "'data' is not allowed"),
])
def test_a_template_may_draw_only_the_plots_own_data(project, content, why):
    _template(project, "evil", content)
    records = read_records(workspace_reader(project))
    failed = {c.sources[0]: c.error for c in records.charts if c.error}
    assert "plots/steering_induce.json" in failed and why in failed["plots/steering_induce.json"]
    others = [c for c in records.charts if c.sources[0] not in ("plots/steering_induce.json",
                                                               "plots/reconstruction.json")]
    assert others and all(c.marks > 0 and c.error is None for c in others)
    assert "Not drawn: plot plots/steering_induce.json" in render(records)


@pytest.mark.parametrize("decl, match", [
    ({"plots": ["/etc/passwd"]}, "is not a project-relative path"),
    ({"plots": ["../outside.json"]}, "is not a project-relative path"),
    ({"plots": ["plots/a.json", "plots/a.json"]}, "plots declared twice: plots/a.json"),
    ({"plots": [{"a": 1, "b": 2}]}, "unreadable plot entry"),
    ({"stages": {"s": {"cmd": "x", "wdir": "sub", "plots": ["p.json"]}}}, "wdir are not supported"),
])
def test_a_declaration_the_report_cannot_follow_is_an_error(decl, match):
    with pytest.raises(ArtifactError, match=match):
        declared_plots(decl)


def test_a_plot_whose_data_is_missing_is_shown_as_not_drawn(project):
    (project / "plots" / "side_effects.json").unlink()
    records = write_report(project)
    chart = next(c for c in records.charts if c.sources == ["plots/side_effects.json"])
    assert chart.error == "plot plots/side_effects.json: its data file plots/side_effects.json is missing"
    assert "Not drawn: plot plots/side_effects.json: its data file" in (project / "report.html").read_text()


# --- hostile strings ------------------------------------------------------------------------------


HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)> \u202eDEIFIREV\u202c'


def test_every_record_string_is_escaped(project):
    recs = dict(RECORDS[4], behaviour=behaviour().model_copy(update={"reason": HOSTILE, "metric": HOSTILE}))
    write_gate(project / "gates" / "behaviour.json", recs["behaviour"])
    decision = decide(recs, TUPLES).to_json()
    decision["claims"]["allowed"][0]["text"] = HOSTILE
    decision["reopen_conditions"][0]["text"] = HOSTILE
    (project / "decision.json").write_text(canonical_json(decision))
    atomic_write_json(project / "plots" / "scorer_agreement.json", [{"version": HOSTILE, "agreement": 0.5}])
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["plots"][0]["plots/steering_induce.json"]["title"] = HOSTILE
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    write_report(project)
    text = (project / "report.html").read_text()
    assert "<script" not in text.lower() and "<img" not in text.lower() and "onerror=" not in text.replace(
        "onerror=alert", "")  # the attribute only ever appears as escaped text
    assert "\u202e" not in text and "\\u202e" in text and "&lt;script&gt;" in text
    assert text.count("\\u202eDEIFIREV") >= 4  # gate reason, metric, claim, reopen condition (and the chart)


# --- counting marks ---------------------------------------------------------------------------------


def test_count_marks_counts_data_marks_only():
    svg = ('<div id="a"><svg><g class="mark-group role-frame root"><g class="mark-rule role-axis-grid"><line/><line/>'
           '</g><g class="mark-text role-axis-label"><text>1</text></g><g class="mark-rect role-mark marks">'
           '<path d="M0,0h5v5h-5Z"></path><path d="M0,0h5v5h-5Z"/></g><g class="mark-symbol role-legend-symbol">'
           '<path/></g></g></svg></div><div id="b"><svg><g class="mark-rect role-mark marks"></g></svg></div>'
           '<div id="c"><p>not drawn</p></div>')
    assert count_marks(svg, ["a", "b", "c", "d"]) == {"a": 2, "b": 0, "c": 0, "d": 0}


# --- the command line -------------------------------------------------------------------------------


def test_cli_writes_the_same_page_and_fails_with_one_message(project, tmp_path):
    write_report(project)
    res = CliRunner().invoke(main, ["report", "--root", str(project), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").read_bytes() == (project / "report.html").read_bytes()
    assert "wrote" in res.stdout and "plots drawn" in res.stdout
    (project / "decision.json").unlink()
    res = CliRunner().invoke(main, ["report", "--root", str(project), "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 5 and res.stderr.strip().splitlines() == [
        "error: missing decision.json: run the pipeline (`dvc repro`) first"]
    assert not (tmp_path / "x.html").exists()


def test_cli_check_says_whether_the_page_is_current(project):
    write_report(project)
    res = CliRunner().invoke(main, ["report", "--root", str(project), "--check"])
    assert res.exit_code == 0 and "is current" in res.stdout
    spec = yaml.safe_load((project / "dvc.yaml").read_text())  # an edit DVC cannot see
    spec["plots"][0]["plots/steering_induce.json"]["title"] = "Induce, retitled"
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    before = (project / "report.html").read_bytes()
    res = CliRunner().invoke(main, ["report", "--root", str(project), "--check"])
    assert res.exit_code == 1 and "report.html is stale" in res.stderr and "dvc repro -f report" in res.stderr
    assert (project / "report.html").read_bytes() == before  # --check writes nothing
    assert CliRunner().invoke(main, ["report", "--root", str(project)]).exit_code == 0
    assert CliRunner().invoke(main, ["report", "--root", str(project), "--check"]).exit_code == 0


def test_cli_help_names_the_page_and_its_exit_codes():
    res = CliRunner().invoke(main, ["report", "--help"])
    assert res.exit_code == 0
    for words in ("self-contained HTML page", "--out", "--check", "5 a record is missing", "11 a gate record",
                  "1 with --check"):
        assert words in res.output
    assert "report: a gate record is not the one decision.json was made from" in " ".join(
        CliRunner().invoke(main, ["--help"]).output.split())


# --- the pipeline's declarations --------------------------------------------------------------------


def test_the_report_stage_depends_on_everything_it_reads():
    stage = DVC_YAML["stages"]["report"]
    deps = set(stage["deps"])
    plots = declared_plots(DVC_YAML)
    need = {"decision.json", "preregistration/lock.json", "metrics/collect.json",
            *(f"gates/{g}.json" for g in RECORDS[4])}
    need |= {s for p in plots for s in p.sources}
    need |= {f".dvc/plots/{p.props['template']}.json" for p in plots
             if (REPO / ".dvc" / "plots" / f"{p.props.get('template')}.json").is_file()}
    assert need <= deps, sorted(need - deps)
    assert [next(iter(o)) for o in stage["outs"]] == ["report.html", "manifests/report.json"]
    assert list(DVC_YAML["stages"])[-1] == "report"  # after decide: every other lock entry exists when it runs


def test_every_plot_names_readable_axis_labels():
    unreadable = [p.id for p in declared_plots(DVC_YAML) if not all(
        isinstance(p.props.get(f"{a}_label"), str) and p.props[f"{a}_label"] != p.props.get(a) for a in ("x", "y"))]
    assert unreadable == []


def test_the_offline_plots_template_is_configured():
    assert "html_template = plots/offline.html" in (REPO / ".dvc" / "config").read_text()


def test_an_svg_with_active_content_is_not_shown(project, monkeypatch):
    """Defence in depth behind vega's own escaping and the page's CSP."""
    evil = '<svg><g class="mark-rect role-mark"><path d="M0,0h1v1z" onload="alert(1)"/></g></svg>'
    monkeypatch.setattr("sasgate.report.draw_svg", lambda spec, origin: evil)
    records = write_report(project)
    assert all(c.error and "holds active content" in c.error for c in records.charts if c.svg is None)
    assert not any(c.svg is not None for c in records.charts)
    assert "onload" not in (project / "report.html").read_text()
