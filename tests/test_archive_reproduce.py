"""`--reproduce` re-runs the bundle's own sasgate source, laid out as installed, ahead of the installed one."""

from __future__ import annotations

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
