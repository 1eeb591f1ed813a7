"""`--reproduce` re-runs the bundle's own sasgate source, laid out as installed, ahead of the installed one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sasgate.archive.reproduce import _sh, source_overlay
from sasgate.errors import ArtifactError

PYPROJECT = """[tool.setuptools.package-dir]
"sasgate" = "sasgate"
"sasgate.stages" = "stages"
"""


def fake_bundle(root: Path, pyproject: str | None = PYPROJECT) -> Path:
    """A bundle's project files: sasgate/ and stages/ as separate folders, as in this repository."""
    (root / "sasgate").mkdir(parents=True)
    (root / "sasgate" / "__init__.py").write_text("FROM = 'bundle'\n")
    (root / "stages").mkdir()
    (root / "stages" / "__init__.py").write_text("")
    (root / "stages" / "probe.py").write_text("import sasgate\nprint('bundle stage', sasgate.FROM)\n")
    if pyproject is not None:
        (root / "pyproject.toml").write_text(pyproject)
    return root


def test_overlay_makes_stage_modules_import_the_bundles_source(tmp_path):
    original = fake_bundle(tmp_path / "bundle")
    project = fake_bundle(tmp_path / "project")  # the re-run's cwd also holds sasgate/ without stages/
    dest = tmp_path / "pythonpath"
    dest.mkdir()
    said = source_overlay(original, dest, project)
    assert said == "the bundle's source (sasgate, sasgate.stages) with the installed dependencies"
    assert (dest / "sasgate" / "stages" / "probe.py").is_file()
    res = _sh([sys.executable, "-m", "sasgate.stages.probe"], project, pythonpath=dest)
    assert res.returncode == 0 and res.stdout == "bundle stage bundle\n", res.stderr
    # without the overlay the stage module would come from the installed sasgate (or not exist at all)
    plain = subprocess.run([sys.executable, "-m", "sasgate.stages.probe"], cwd=project, capture_output=True,
                           text=True)
    assert plain.stdout != "bundle stage bundle\n"


def test_bundle_without_sasgate_source_runs_the_installed_one(tmp_path):
    original = fake_bundle(tmp_path / "bundle", pyproject=None)
    (tmp_path / "pythonpath").mkdir()
    assert source_overlay(original, tmp_path / "pythonpath", original).startswith("the installed sasgate ")
    assert not any((tmp_path / "pythonpath").iterdir())


@pytest.mark.parametrize("pyproject, message", [
    (PYPROJECT + '"sasgate.watch" = "watch"\n', "maps to 'watch', not a folder of the bundle"),
    ('[tool.setuptools.package-dir]\n"sasgate" = "../outside"\n', "not a folder of the bundle"),
    ("[tool.setuptools\n", "pyproject.toml: unreadable"),
])
def test_a_bad_package_map_is_refused(tmp_path, pyproject, message):
    original = fake_bundle(tmp_path / "bundle", pyproject)
    (tmp_path / "pythonpath").mkdir()
    with pytest.raises(ArtifactError, match=message):
        source_overlay(original, tmp_path / "pythonpath", original)


# --- verdicts: what must not flip for decision-equivalent (ARCHITECTURE.md, "The archive contract") ---


def test_the_behaviour_comparisons_are_compared_by_kind_and_operator():
    """The record shape of issue 11: a top-level outcome and one comparison per (kind, operator)."""
    from sasgate.archive.reproduce import _gate_verdicts

    rec = {"status": "pass", "per_tuple": [], "outcome": "holds",
           "comparisons": [{"kind": "induce", "operator": "addition", "estimate": -0.099, "outcome": "holds"},
                           {"kind": "bypass", "operator": "directional_ablation", "estimate": 0.02,
                            "outcome": "holds"}]}
    got = _gate_verdicts("gates/behaviour.json", rec)
    assert got["gates/behaviour.json outcome"] == "holds"
    assert got["gates/behaviour.json comparison (induce, addition) outcome"] == "holds"
    flipped = {**rec, "outcome": "inconclusive",
               "comparisons": [{**rec["comparisons"][0], "estimate": -0.101, "outcome": "inconclusive"},
                               rec["comparisons"][1]]}
    new = _gate_verdicts("gates/behaviour.json", flipped)
    assert [k for k in got if got[k] != new[k]] == ["gates/behaviour.json outcome",
                                                     "gates/behaviour.json comparison (induce, addition) outcome"]


def _run_dir(root: Path, holds: bool, allowed: list[str]) -> Path:
    """A run's decision.json and gate records (constructed), the induce comparison holding or failing."""
    from gate_records import TUPLES, behaviour, reconstruction, remediation, stability
    from sasgate.decision import decide
    from sasgate.gates import write_gate

    induce = (-0.05, 0.05) if holds else (-0.3, -0.2)
    records = {r.gate: r for r in [behaviour(cis=(induce, (-0.05, 0.05))), stability(), reconstruction(0.163, 0.195),
                                   remediation("stopped")]}
    for rec in records.values():
        write_gate(root / "gates" / f"{rec.gate}.json", rec)
    d = decide(records, TUPLES).to_json()
    d["claims"]["allowed"] = [c for c in d["claims"]["allowed"] if c["id"] in allowed]
    (root / "decision.json").write_text(json.dumps(d))
    return root


def test_verdict_flips_name_each_flipped_verdict(tmp_path):
    from sasgate.archive.reproduce import verdict_flips

    allowed = ["behaviour-decision-valid", "behaviour-stable-as-tested"]
    old = _run_dir(tmp_path / "old", holds=False, allowed=allowed)
    assert verdict_flips(old, _run_dir(tmp_path / "same", holds=False, allowed=allowed)) == []
    new = _run_dir(tmp_path / "new", holds=True, allowed=allowed[:1])
    assert verdict_flips(old, new) == [
        "decision.json allowed claims: the re-run gains none and loses ['behaviour-stable-as-tested']",
        "decision.json disallowed claims: the re-run gains ['sas-falls-short-of-dim'] and loses ['sas-matches-dim']",
        "gates/behaviour.json outcome: 'fails' in the bundle, 'holds' in the re-run",
        "gates/behaviour.json comparison (induce, addition) outcome: 'fails' in the bundle, 'holds' in the re-run"]
    (new / "gates" / "stability.json").unlink()
    (new / "gates" / "remediation.json").write_text('{"schema": "sasgate.gate/2", "gate": "remediation"}')
    flips = verdict_flips(old, new)
    assert "gates/stability.json status: 'pass' in the bundle, 'absent' in the re-run" in flips
    assert any(f.startswith("gates/remediation.json status: 'fail' in the bundle, ") and
               "malformed (gates/remediation.json: invalid gate record: missing field" in f for f in flips)
