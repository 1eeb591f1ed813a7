"""`sasgate plan`: a dry run that sizes every stage without downloading or writing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sasgate.params import load_params, parse_params
from sasgate.plan import format_plan, plan

REPO = Path(__file__).resolve().parents[1]
STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sasgate.cli", "plan", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_gemma_plan_downloads_nothing(tmp_path):
    """The Gemma preset is sized from transformer-lens's built-in config with an empty HF cache."""
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    env = dict(os.environ, HF_HOME=str(hf_home))
    env.pop("HF_HUB_OFFLINE", None)
    before = sorted(p.name for p in REPO.iterdir())
    res = _cli("--params", str(REPO / "configs" / "gemma-2-2b-it.yaml"), "--json", cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert not [p for p in hf_home.rglob("*") if p.is_file()], "plan wrote to the HF cache"
    assert sorted(p.name for p in REPO.iterdir()) == before
    arch = report["architecture"]
    assert (arch["n_layers"], arch["d_model"], arch["d_mlp"]) == (26, 2304, 9216)
    # 2.6 B parameters, plus the untied unembedding transformer-lens keeps (256000 x 2304)
    assert 3.1e9 < arch["n_params"] < 3.3e9
    assert [s["stage"] for s in report["stages"]] == STAGES
    collect = next(s for s in report["stages"] if s["stage"] == "collect")
    assert collect["memory_bytes"] > arch["n_params"] * 2  # bf16 weights at least
    assert any("gemma-2-2b-it@" in d for d in report["downloads"])
    assert any("width_16k" in d for d in report["downloads"])


def test_toy_plan_is_exact_and_scales_with_the_eval_set(tiny_params_raw):
    """The toy's prompts are tokenized exactly; doubling n_eval doubles eval tokens and activation disk."""
    small = plan(parse_params(tiny_params_raw))
    tiny_params_raw["eval"]["n_eval"] *= 2
    large = plan(parse_params(tiny_params_raw))
    assert small["prompt_tokens_source"].startswith("exact")
    assert small["downloads"] == []
    assert large["prompts"]["eval"] == 2 * small["prompts"]["eval"]
    assert large["prompt_tokens"]["eval"] > 1.8 * small["prompt_tokens"]["eval"]
    disk = {p["stage"]: p["disk_bytes"] for p in small["stages"]}, {p["stage"]: p["disk_bytes"] for p in large["stages"]}
    assert disk[1]["collect"] > disk[0]["collect"]
    assert disk[1]["steer"] == 2 * disk[0]["steer"]
    text = format_plan(large)
    for stage in STAGES:
        assert f"\n{stage} " in text


def test_plan_flags_a_missing_device():
    params = load_params(REPO / "params.yaml")
    raw = params.model_dump(mode="json")
    raw["runtime"]["device"] = "cuda"
    report = plan(parse_params(raw))
    import torch

    assert any("cuda" in w for w in report["warnings"]) != torch.cuda.is_available()


def test_plan_bad_params_exit_2(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("tuples: []\n")
    res = _cli("--params", str(bad), cwd=tmp_path, env=dict(os.environ))
    assert res.returncode == 2
    assert "tuples" in res.stderr
