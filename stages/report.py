"""`report`: report.html, one self-contained page of the decision, the gates, the claims and every plot.

Its own stage, after `decide`: it reads what every other stage wrote (decision.json, the gate
records, the plots dvc.yaml declares, dvc.lock, whose entries are all written by then), so a
change to a plot, a template or the page's code re-renders only the page, and a chart that
cannot be drawn never holds up the decision. A chart that fails is shown as failed on the page
and named on stderr; the records themselves must be complete and consistent (exit 5, 11).
"""

from __future__ import annotations

import click

from sasgate.artifacts import write_manifest
from sasgate.params import Params
from sasgate.paths import Paths
from sasgate.report import STAGE, Records, write_report
from sasgate.stage_runner import stage_main


def run(params: Params, paths: Paths) -> Records:
    records = write_report(paths.root, paths.report)
    for chart in records.charts:
        if chart.error:
            click.echo(f"sasgate report: warning: {chart.error}", err=True)
    write_manifest(paths.manifest(STAGE), STAGE, [paths.report], paths.root)
    return records


if __name__ == "__main__":
    stage_main(STAGE, run)
