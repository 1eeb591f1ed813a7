"""The reproduced pipeline's report and DVC's plots page, opened offline in a real headless Chromium.

On the session's `reproduced_small` project (one real `dvc repro`, tests/conftest.py): every plot dvc.yaml
declares must have drawn data marks (counted in the DOM Chromium dumps), in the report and in the page
`dvc plots show` writes with the offline template .dvc/config names. A chart that draws nothing fails.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from dvc_render import VegaRenderer

from browser import dump_dom
from projects import copy_project, dvc, env
from sasgate.artifacts import read_json, sha256_file
from sasgate.plots import count_marks, declared_plots
from sasgate.report import lock_digest

pytestmark = pytest.mark.slow


def _plots(root):
    return declared_plots(yaml.safe_load((root / "dvc.yaml").read_text()))


def _judge(plots, drawn: dict[str, int]) -> None:
    """Every plot drew marks."""
    assert sorted(p.id for p in plots if drawn[p.id] == 0) == [], drawn


def test_the_pipelines_report_opens_offline_with_every_chart_drawn(reproduced_small):
    root = reproduced_small
    page = root / "report.html"
    assert read_json(root / "manifests" / "report.json")["files"]["report.html"]["sha256"] == sha256_file(page)
    text = page.read_text()
    assert lock_digest((root / "dvc.lock").read_bytes())[0] in text  # current after `dvc repro`
    dom = dump_dom(page, wait_ms=1000)
    figures = re.findall(r'<figure class="chart[^"]*" id="(plot-\d+)" data-plot="([^"]+)"', dom)
    plots = _plots(root)
    assert [f[1] for f in figures] == [p.sources[0] for p in plots]
    counts = count_marks(dom, [f[0] for f in figures])
    assert "<script" not in dom and "Content-Security-Policy" in dom
    _judge(plots, {p.id: counts[f[0]] for p, f in zip(plots, figures)})


def test_sasgate_report_rerenders_the_same_bytes(reproduced_small, tmp_path):
    out = tmp_path / "again.html"
    res = subprocess.run([sys.executable, "-m", "sasgate.cli", "report", "--out", str(out)], cwd=reproduced_small,
                         env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == (reproduced_small / "report.html").read_bytes()


def test_dvc_plots_show_draws_every_plot_offline(reproduced_small, tmp_path):
    root = copy_project(reproduced_small, tmp_path / "p")
    dvc(root, "plots", "show", "-o", str(tmp_path / "dvc_plots"))  # the template comes from .dvc/config
    page = tmp_path / "dvc_plots" / "index.html"
    source = page.read_text()
    assert "cdn.jsdelivr" not in source and not re.search(r"<script[^>]*\ssrc=", source)
    dom = dump_dom(page)
    plots = _plots(root)
    ids = {VegaRenderer.remove_special_chars(p.id): p for p in plots}
    assert set(re.findall(r"vegaEmbed\('#([^']+)'", source)) == set(ids)  # DVC drew a div for every plot
    counts = count_marks(dom, ids)
    _judge(plots, {p.id: counts[i] for i, p in ids.items()})


def test_status_flags_a_hand_edited_report(reproduced_small, tmp_path):
    root = copy_project(reproduced_small, tmp_path / "p")

    def status():
        return subprocess.run([sys.executable, "-m", "sasgate.cli", "status"], cwd=root, env=env(),
                              capture_output=True, text=True)

    assert status().returncode == 0
    page = root / "report.html"
    page.write_text(page.read_text().replace("We cannot claim", "We can also claim"))
    res = status()
    assert res.returncode == 1 and "report.html" in res.stdout, res.stdout
