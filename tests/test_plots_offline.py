"""DVC's plots page offline: .dvc/plots/offline.html inlines the exact vega files `dvc plots show` loads from a
CDN, and every plot dvc.yaml declares draws in it (vega-lite 5.2.0, as DVC embeds it) and in the report's
SVG; a chart that draws nothing is caught. Constructed data (tests/test_report.py), real Chromium.
The same pages from a reproduced pipeline: tests/test_report_browser.py.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from dvc_render import VegaRenderer, render_html

from browser import dump_dom
from sasgate.plots import Plot, count_marks, declared_plots, renderer
from sasgate.report import workspace_reader, write_report
from test_report import DVC_YAML, make_project

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / ".dvc" / "plots" / "offline.html"
# sha256 of each package's `jsdelivr` file (the one the CDN URL serves), from the tarballs `npm pack` fetched
# and checked against the registry's integrity: vega-5.20.2.tgz, vega-lite-5.2.0.tgz, vega-embed-6.18.2.tgz.
NPM = {"vega@5.20.2": "4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be",
       "vega-lite@5.2.0": "d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb",
       "vega-embed@6.18.2": "1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e"}


def test_the_template_inlines_exactly_the_files_dvc_loads_from_the_cdn():
    text = TEMPLATE.read_text(encoding="utf-8")
    inlined = {m.group(1): hashlib.sha256(m.group(2).encode()).hexdigest()
               for m in re.finditer(r'<script data-package="([^"]+)">\n(.*?)\n</script>', text, re.S)}
    assert inlined == NPM
    cdn = re.findall(r'src="https://cdn\.jsdelivr\.net/npm/([^"]+)"', VegaRenderer.SCRIPTS)
    assert cdn == list(NPM), "dvc-render loads other vega versions now: re-run tools/offline_plots_template.py"
    assert "{plot_divs}" in text and "{scripts}" not in text  # DVC's CDN tags have nowhere to go
    assert not re.search(r"<script[^>]*\ssrc=|<link", text)


def _dvc_page(project: Path, plots: list[Plot], out: Path) -> Path:
    read = workspace_reader(project)
    render_html([renderer(p, read) for p in plots], out, html_template=TEMPLATE)
    return out


def _drawn(dom: str, ids: dict[str, str]) -> dict[str, int]:
    counts = count_marks(dom, ids)
    return {plot: counts[i] for i, plot in ids.items()}


def test_every_declared_plot_draws_in_dvcs_vega_lite_and_a_broken_one_is_caught(tmp_path):
    project = make_project(tmp_path / "p")
    plots = declared_plots(DVC_YAML)
    page = _dvc_page(project, plots, tmp_path / "dvc_plots" / "index.html")
    assert "cdn.jsdelivr" not in page.read_text()
    dom = dump_dom(page)
    ids = {VegaRenderer.remove_special_chars(p.id): p.id for p in plots}
    drawn = _drawn(dom, ids)
    states = dict(re.findall(r'<div id="([^"]+)"[^>]*data-sasgate-render="([^"]*)"', dom))
    for p in plots:
        div = VegaRenderer.remove_special_chars(p.id)
        assert drawn[p.id] > 0 and states[div] == "ok", (p.id, states.get(div))
    # a broken one: the y field `tuple` collides with vega-lite's selection signal `grid_tuple` in DVC's
    # bar_horizontal (the reconstruction plot used it once): nothing drawn, and vega-embed's error recorded
    (project / "plots" / "stability.json").write_text('[{"tuple": "a", "sas_minus_dim": 1}]')
    bad = Plot("plots/stability.json", {"template": "bar_horizontal", "x": "sas_minus_dim", "y": "tuple"}, None)
    dom = dump_dom(_dvc_page(project, [bad], tmp_path / "bad" / "index.html"))
    assert _drawn(dom, {"plots_stability_json": bad.id}) == {bad.id: 0}
    states = dict(re.findall(r'<div id="([^"]+)"[^>]*data-sasgate-render="([^"]*)"', dom))
    assert states["plots_stability_json"].startswith("error: Error: Duplicate signal name"), states


def test_the_report_draws_every_declared_plot_in_chromium_and_a_broken_one_is_caught(tmp_path):
    project = make_project(tmp_path / "p")
    records = write_report(project)
    dom = dump_dom(project / "report.html", wait_ms=1000)
    ids = {c.id: c.sources[0] for c in records.charts}
    assert set(ids.values()) == {p.sources[0] for p in declared_plots(DVC_YAML)}
    drawn = _drawn(dom, ids)
    for chart in records.charts:
        assert drawn[chart.sources[0]] > 0, (chart.sources, drawn)
        assert drawn[chart.sources[0]] == chart.marks  # what the browser shows is what was drawn
    assert "<script" not in dom
    # a broken declaration (the y field `tuple`, see above) is drawn as nothing, with its error on the page
    dvc_yaml = project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("y: required_tuple", "y: tuple")
                        .replace("template: ci_rule", "template: bar_horizontal"))
    (project / "plots" / "reconstruction.json").write_text('[{"tuple": "L0.resid_pre", "nmse": 0.2, "threshold": 0.12}]')
    records = write_report(project)
    broken = [c for c in records.charts if c.sources[0] == "plots/reconstruction.json"]
    assert len(broken) == 1 and broken[0].marks == 0 and broken[0].error, broken
    dom = dump_dom(project / "report.html", wait_ms=1000)
    assert _drawn(dom, {broken[0].id: "plots/reconstruction.json"}) == {"plots/reconstruction.json": 0}

