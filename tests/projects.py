"""Make throwaway sasgate projects (real git + real DVC) for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GIT_ENV = {"GIT_AUTHOR_NAME": "sasgate test", "GIT_AUTHOR_EMAIL": "test@sasgate.invalid",
           "GIT_COMMITTER_NAME": "sasgate test", "GIT_COMMITTER_EMAIL": "test@sasgate.invalid"}

# A pipeline small enough for CI, with a real refusal behaviour: a 3-layer organism trained just enough to
# refuse (held-out refusal 1.0 harmful / 0.02 harmless), 2 tuples, a few thousand SAE training tokens. Its DIM
# direction works on the eval split (see tests/test_behaviour_pipeline.py for what is asserted), and both
# behaviour gates pass with 8 eval source prompts per class (validity.min_samples 8). The 3-layer model's
# interventions move its next-token distributions more than a big model's, hence directions.kl_threshold 0.5
# and a side-effect budget of 1 nat per token; L0.resid_pre sees the same post-instruction tokens for every
# prompt (no class difference to steer with), hence the explicit SAS tuple.
SMALL = {
    "model": {"toy": {"n_layers": 3, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 48,
                      "corpus_size": 600, "train_steps": 200, "batch_size": 32, "lr": 0.01, "n_validation": 8}},
    "eval": {"n_selection": 8, "n_eval": 8, "n_paraphrases": 1},
    "tuples": [{"layer": 0, "site": "resid_pre", "sae": "train"}, {"layer": 1, "site": "resid_post", "sae": "train"}],
    "saes": {"train": {"expansion_factor": 2, "k": 4, "training_tokens": 4096, "batch_size": 256,
                       "corpus_sequences": 200}},
    "collect": {"batch_size": 8, "max_new_tokens": 4},
    "reconstruction": {"bootstrap_samples": 50},
    "directions": {"kl_threshold": 0.5},
    "features": {"steer_tuple": "L1.resid_post"},
    "steer": {"add_strengths": [0.5, 1.0, 2.0], "ablate_strengths": [0.5, 1.0], "seeds": [0, 1],
              "max_new_tokens": 6},
    "validity": {"min_samples": 8, "side_effect_budget": 1.0, "bootstrap_samples": 200},
}


def env() -> dict[str, str]:
    e = dict(os.environ, **GIT_ENV)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"  # `python` in dvc.yaml = this venv
    e["DVC_NO_ANALYTICS"] = "1"
    # Run the checkout under test, never a mix: without this, `python -m` in a project copy imports
    # `sasgate` from the copy but `sasgate.stages` (mapped by the editable install) from the checkout.
    e["PYTHONSAFEPATH"] = "1"
    return e


def sh(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def source_files() -> list[str]:
    """The project's files as a clone would have them (tracked + untracked, not ignored)."""
    res = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return [f for f in res.stdout.splitlines() if (REPO / f).is_file()]


def make_project(dest: Path, overrides: dict | None = None, lock: bool = True) -> Path:
    """Copy the project into dest, apply params overrides, re-lock the eval set and re-preregister the
    remediation protocol (lock=True), commit."""
    for rel in source_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    for generated in ("artifacts", "gates", "metrics", "plots", "manifests", "dvc.lock"):
        p = dest / generated
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(raw, overrides or {}), sort_keys=False))
    sh(["git", "init", "-q", "-b", "main"], dest)
    if lock:  # the eval set and the remediation protocol were locked on the default params: re-fix them
        sh([sys.executable, "-m", "sasgate.cli", "lock", "--reason", "test config"], dest)
        sh([sys.executable, "-m", "sasgate.cli", "preregister", "--reason", "test config"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-q", "-m", "test project"], dest)
    return dest


def dvc(dest: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], dest, check=check)


def lock_out_hashes(dest: Path) -> dict[str, str]:
    """{stage/out path: md5} from dvc.lock."""
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    return {f"{name}:{o['path']}": o["md5"] for name, st in lock["stages"].items() for o in st.get("outs", [])}


def copy_project(src: Path, dest: Path) -> Path:
    """A private copy of a reproduced project (git, DVC cache and outputs), to change without
    disturbing the shared one."""
    shutil.copytree(src, dest, symlinks=True)
    return dest
