"""A grid from `-S` overrides, parsed by DVC's own parser (Hydra's grammar, as `dvc exp run --queue -S`),
and each point checked against the params schema before anything is submitted."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import ParamsError, SweepError
from ..params import load_params

PARAMS_FILE = "params.yaml"


def expand(overrides: list[str]) -> list[list[str]]:
    """Every point of the grid, in DVC's order, as the `-S key=value` list `dvc exp run` takes.

    `-S features.top_k=2,6 -S saes.train.k=3,16` gives 4 points. Only params.yaml is swept (the file
    the schema covers); `range(...)` and `choice(...)` work as in DVC; glob sweeps do not.
    """
    from dvc.exceptions import DvcException
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    if not overrides:
        raise SweepError("a sweep needs at least one -S key=value[,value...]")
    by_file = to_path_overrides(overrides)
    others = sorted(set(by_file) - {PARAMS_FILE})
    if others:
        raise SweepError(f"a sweep sets params.yaml keys only, not {others}")
    try:
        points = [p[PARAMS_FILE] for p in get_hydra_sweeps(by_file)]
    except (DvcException, HydraException) as exc:
        raise SweepError(f"cannot parse the overrides {overrides}: {exc}") from None
    if len({tuple(p) for p in points}) != len(points):
        raise SweepError(f"the overrides {overrides} give the same point twice")
    return points


def check_point(root: Path, point: list[str]) -> None:
    """Apply one point to a copy of params.yaml the way `dvc exp run -S` will, then validate it."""
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory(prefix="sasgate-sweep-") as tmp:
        copy = Path(tmp) / PARAMS_FILE
        shutil.copyfile(root / PARAMS_FILE, copy)
        try:
            apply_overrides(copy, point)
        except DvcException as exc:
            cause = exc.__cause__ or exc
            raise SweepError(f"point {' '.join(point)}: {cause}".strip()) from None
        try:
            load_params(copy)
        except ParamsError as exc:
            raise SweepError(f"point {' '.join(point)}: {str(exc).replace(str(copy), PARAMS_FILE)}") from None
