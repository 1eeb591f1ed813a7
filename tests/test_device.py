"""--device / SASGATE_DEVICE on every stage entry, and a reduced-precision toy (bf16)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sasgate.device import DEVICE_ENV, available, with_device
from sasgate.errors import ParamsError
from sasgate.params import parse_params

REPO = Path(__file__).resolve().parents[1]
MISSING = next((d for d in ("cuda", "mps") if not available(d)), None)


def _stage(root: Path, *args: str, env_device: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != DEVICE_ENV}
    if env_device:
        env[DEVICE_ENV] = env_device
    return subprocess.run([sys.executable, "-m", "sasgate.stages.params", *args], cwd=root, env=env,
                          capture_output=True, text=True)


@pytest.fixture
def project(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_device_option_is_recorded_in_the_run_log(project):
    res = _stage(project, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    entry = json.loads((project / "logs" / "runs.jsonl").read_text().splitlines()[-1])
    assert (entry["stage"], entry["device"], entry["dtype"]) == ("params", "cpu", "float32")


def test_unknown_device_exits_2_before_any_output(project):
    res = _stage(project, "--device", "tpu")
    assert res.returncode == 2
    assert "--device = 'tpu'" in res.stderr and "cpu" in res.stderr
    assert not (project / "artifacts").exists()


@pytest.mark.skipif(MISSING is None, reason="this machine has every device")
def test_device_this_machine_lacks_exits_2(project):
    res = _stage(project, env_device=MISSING)
    assert res.returncode == 2
    assert f"${DEVICE_ENV} = '{MISSING}'" in res.stderr and "no " + MISSING in res.stderr
    assert not (project / "artifacts").exists()


def test_override_precedence(tiny_params_raw, monkeypatch):
    params = parse_params(tiny_params_raw)
    monkeypatch.setenv(DEVICE_ENV, "nonsense")
    with pytest.raises(ParamsError, match=r"\$SASGATE_DEVICE = 'nonsense'"):
        with_device(params)
    assert with_device(params, "cpu").runtime.device == "cpu"  # --device wins over the environment
    monkeypatch.delenv(DEVICE_ENV)
    assert with_device(params) is params


def test_bf16_toy_captures_what_fp32_does(tiny_toy_root, tiny_params_raw, tmp_path):
    """model.dtype bfloat16 casts the float32-trained toy as it loads; activations are still stored
    as float32 and stay close to the float32 model's."""
    from sasgate.evalset import resolve_eval_set
    from sasgate.modeling import load_chat_model
    from sasgate.paths import Paths
    from sasgate.stages.collect import capture_split

    paths = Paths.at(tiny_toy_root)
    acts = {}
    for dtype in ("float32", "bfloat16"):
        raw = dict(tiny_params_raw, model=dict(tiny_params_raw["model"], dtype=dtype))
        params = parse_params(raw)
        chat = load_chat_model(params, paths)
        assert next(chat.model.parameters()).dtype == getattr(torch, dtype)
        items = [it for it in resolve_eval_set(params, paths) if it.split == "eval"]
        capture_split(chat, items, params.tuples, tmp_path / dtype, 8)
        from safetensors.torch import load_file

        acts[dtype] = load_file(str(tmp_path / dtype / f"{params.tuples[-1].key}.safetensors"))["acts"]
    assert acts["bfloat16"].dtype == torch.float32
    rel = (acts["bfloat16"] - acts["float32"]).norm() / acts["float32"].norm()
    assert 0 < rel < 0.05
