"""`sasgate watch --evaluate`: newly covering Hub SAEs are fetched and measured by the reconstruction gate.

A toy project with eval activations at L1.resid_post; the Hub imitation serves two real sae-lens
SAEs for it: one that reconstructs exactly (ReLU pairs: x = relu(x) - relu(-x)) and one with
scrambled weights. Whether the reopened path would pass follows from which SAEs are new.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import save_file

from hubsim import HubSim, hub_env, watch_command
from sasgate import sae_io
from sasgate.activations import activation_file, token_index_file, write_token_index
from sasgate.paths import Paths

D = 8
PARAMS = {"model": {"toy": {"n_layers": 2, "d_model": D, "n_heads": 2, "d_mlp": 16}},
          "tuples": [{"layer": 1, "site": "resid_post"}],
          "reconstruction": {"bootstrap_samples": 50},
          "watch": {"registry": False, "authors": ["jbloom"], "tags": [], "searches": [], "backoff_s": 0.0}}
SHA = ["1" * 40, "2" * 40]


def _sae(folder, exact: bool) -> None:
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=D, d_sae=2 * D)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    cfg.metadata.model_name = "toy-refusal"
    sae = StandardSAE(cfg)
    eye = torch.eye(D)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        if exact:
            sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
            sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        else:
            sae.W_enc.copy_(torch.randn(D, 2 * D, generator=torch.Generator().manual_seed(0)))
            sae.W_dec.copy_(torch.randn(2 * D, D, generator=torch.Generator().manual_seed(1)))
    sae_io.save_sae(sae, folder)


def _repo(root, names: list[str], sha: str) -> dict:
    files = {}
    for name in names:
        for f in ("cfg.json", "sae_weights.safetensors"):
            files[f"{name}/{f}"] = {"file": str(root / "local_saes" / name / f)}
    return {"id": "jbloom/toy-saes", "sha": sha, "lastModified": "2026-06-01T00:00:00.000Z", "tags": ["sae_lens"],
            "files": files}


def _eval_activations(paths: Paths) -> None:
    n = 30 * 4
    prompt = torch.arange(30).repeat_interleave(4)
    position = torch.arange(4).repeat(30)
    (paths.collect_dir / "eval").mkdir(parents=True)
    write_token_index(token_index_file(paths, "eval"), {
        "prompt_index": prompt, "position": position, "is_bos": (position == 0).to(torch.uint8),
        "post_instruction": torch.zeros(n, dtype=torch.long)})
    save_file({"acts": torch.randn(n, D, generator=torch.Generator().manual_seed(2))},
              str(activation_file(paths, "eval", "L1.resid_post")))


@pytest.mark.slow
def test_evaluate_reports_whether_the_reopened_path_would_pass(tmp_path):
    """Also: --evaluate that cannot finish (no eval activations yet: exit 5) leaves the reopen pending, so the
    next poll reports it (exit 10) instead of "already reported"."""
    root = tmp_path
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    paths = Paths.at(root)
    _sae(root / "local_saes" / "a-scrambled", exact=False)
    _sae(root / "local_saes" / "b-exact", exact=True)

    def run(sim, *extra):
        return subprocess.run(watch_command(tmp_path / "slept.json", "--json", "--state", str(tmp_path / "s.json"),
                                            *extra), cwd=root, env=hub_env(sim.url, tmp_path / "hf"),
                              capture_output=True, text=True, timeout=300)

    def poll(sim, *extra):
        res = run(sim, *extra)
        assert res.returncode in (0, 10), res.stderr
        return res.returncode, json.loads(res.stdout)

    with HubSim({"repos": []}) as sim:
        assert poll(sim)[0] == 0  # the lock-time baseline: nothing
        sim.set_scenario({"repos": [_repo(root, ["a-scrambled"], SHA[0])]})
        failed = run(sim, "--evaluate")  # the reopen is met, but the evaluation cannot run
        assert failed.returncode == 5 and failed.stdout == "", (failed.returncode, failed.stderr)
        assert "missing activation file" in failed.stderr and "run `dvc repro collect`" in failed.stderr
        assert "the reopen condition is met and stays pending; the next poll reports it again" in failed.stderr
        assert json.loads((tmp_path / "s.json").read_text())["reopen"]["reported"] is False
        _eval_activations(paths)
        rc, report = poll(sim, "--evaluate")
        ev = report["evaluation"]
        assert rc == 10 and ev["would_pass"] is False  # reported now, by the run whose evaluation finished
        (row,) = ev["per_tuple"]["toy-refusal:L1.resid_post"]
        assert row["status"] == "fail" and row["nmse"] > 0.12
        assert row["spec"] == f"hf:jbloom/toy-saes/a-scrambled@{SHA[0]}"

        sim.set_scenario({"repos": [_repo(root, ["a-scrambled", "b-exact"], SHA[1])]})
        rc, report = poll(sim, "--evaluate")
        assert rc == 0  # reported once
        rows = report["evaluation"]["per_tuple"]["toy-refusal:L1.resid_post"]
        assert report["evaluation"]["would_pass"] is True
        assert [(r["id"].rsplit("/", 1)[-1], r["status"]) for r in rows] == [("a-scrambled", "fail"), ("b-exact", "pass")]
        assert rows[1]["nmse"] == pytest.approx(0.0, abs=1e-6)
