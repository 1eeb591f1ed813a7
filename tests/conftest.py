"""Shared fixtures: a tiny trained toy-refusal model, built once per test session."""

from __future__ import annotations

import copy

import pytest

# Small enough to train in a couple of seconds on 2 CPU cores; the model stage accepts it as is.
TINY_PARAMS = {
    "model": {"toy": {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 48,
                      "corpus_size": 400, "train_steps": 60, "batch_size": 32, "lr": 0.003, "n_validation": 4}},
    "eval": {"n_selection": 4, "n_eval": 8, "n_paraphrases": 1},
    "tuples": [{"layer": 0, "site": "resid_pre", "sae": "train"}, {"layer": 1, "site": "resid_post", "sae": "train"}],
}


@pytest.fixture
def tiny_params_raw() -> dict:
    """A fresh copy of TINY_PARAMS (a params.yaml mapping) to modify freely."""
    return copy.deepcopy(TINY_PARAMS)


@pytest.fixture(scope="session")
def tiny_toy_root(tmp_path_factory):
    """A project root where the `model` stage has run on TINY_PARAMS (artifacts/model, metrics, manifest)."""
    from sasgate.determinism import make_deterministic
    from sasgate.params import parse_params
    from sasgate.paths import Paths
    from sasgate.stages import model as model_stage

    params = parse_params(copy.deepcopy(TINY_PARAMS))
    make_deterministic(params.runtime.seed, params.runtime.threads)
    paths = Paths.at(tmp_path_factory.mktemp("tiny_toy"))
    model_stage.run(params, paths)
    return paths.root


@pytest.fixture(scope="session")
def tiny_toy_dir(tiny_toy_root):
    """artifacts/model of the tiny trained toy model (model.safetensors, config.json, tokenizer.json)."""
    return tiny_toy_root / "artifacts" / "model"


@pytest.fixture(scope="session")
def reproduced_small(tmp_path_factory):
    """The SMALL project (tests/projects.py) after one full `dvc repro`, built once per session and
    shared by the end-to-end tests: never change it; take a `copy_project` first."""
    from projects import SMALL, dvc, make_project

    dest = make_project(tmp_path_factory.mktemp("reproduced_small") / "project", SMALL)
    dvc(dest, "repro")
    return dest
