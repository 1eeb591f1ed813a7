"""SAE sourcing (sasgate.sae_io, stage `saes`): training with sae-lens, pinned Hub loading, local folders.

No test touches the network: the Hub paths run against a local Hugging Face cache with
HF_HUB_OFFLINE on (empty: a clear error; filled at a pinned commit: a real load).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from sasgate import sae_io
from sasgate.errors import ArtifactError, ParamsError
from sasgate.params import parse_params
from sasgate.paths import Paths

SMALL_SAES = {"train": {"architecture": "topk", "expansion_factor": 2, "k": 4, "training_tokens": 4096,
                        "batch_size": 256, "corpus_sequences": 200, "lr": 0.001}}
REV = "0123456789abcdef0123456789abcdef01234567"
OTHER_REV = "fedcba9876543210fedcba9876543210fedcba98"


def _params(raw_base: dict, **over):
    raw = copy.deepcopy(raw_base)
    raw["saes"] = copy.deepcopy(SMALL_SAES)
    raw.update(over)
    return parse_params(raw)


def _root_with_model(tmp: Path, tiny_toy_dir: Path) -> Paths:
    shutil.copytree(tiny_toy_dir, tmp / "artifacts" / "model")
    return Paths.at(tmp)


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_toy_dir):
    """The `saes` stage run twice, in two fresh roots, on the tiny toy model."""
    from conftest import TINY_PARAMS
    from sasgate.determinism import make_deterministic
    from sasgate.stages import saes

    params = _params(TINY_PARAMS)
    roots = []
    for name in ("a", "b"):
        make_deterministic(params.runtime.seed, params.runtime.threads)
        paths = _root_with_model(tmp_path_factory.mktemp(f"saes_{name}"), tiny_toy_dir)
        saes.run(params, paths)
        roots.append(paths)
    return params, roots


def test_trained_saes_are_byte_identical_across_runs(trained):
    _params_, (a, b) = trained
    for rel in ("artifacts/saes", "metrics/saes.json", "manifests/saes.json"):
        pa, pb = a.root / rel, b.root / rel
        da = _digests(pa) if pa.is_dir() else {rel: hashlib.sha256(pa.read_bytes()).hexdigest()}
        db = _digests(pb) if pb.is_dir() else {rel: hashlib.sha256(pb.read_bytes()).hexdigest()}
        assert da == db, rel
    assert sorted(_digests(a.saes_dir)) == sorted(
        f"{k}/{f}" for k in ("L0.resid_pre", "L1.resid_post") for f in ("cfg.json", "sae_weights.safetensors",
                                                                         "source.json"))


def test_trained_sae_records_and_loads(trained):
    params, (a, _b) = trained
    metrics = json.loads(a.metrics("saes").read_text())
    for tp in params.tuples:
        folder = a.sae_dir(tp.key)
        src = json.loads((folder / "source.json").read_text())
        assert src["spec"] == "train" and src["kind"] == "train" and src["revision"] is None
        assert src["sae"] == {"architecture": "topk", "d_in": 32, "d_sae": 64, "dtype": "float32",
                              "hook_name": tp.hook_name, "model_name": "toy-refusal"}
        assert src["checks"]["hook_match"] == "exact" and src["checks"]["d_in_equals_d_model"]
        for name, digest in src["files"].items():
            assert digest == "sha256:" + hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert src["training"]["corpus"]["sequences"] == 200 and src["training"]["steps"] == 16
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["device"] == "cpu" and list(cfg) == sorted(cfg)
        sae, rec = sae_io.load_tuple_sae(a, tp)
        assert rec == src and sae.cfg.d_sae == 64 and sae.cfg.metadata.hook_name == tp.hook_name
        m = metrics["tuples"][tp.key]
        assert m["kind"] == "train" and m["architecture"] == "topk" and m["d_sae"] == 64
        assert 0.0 < m["train_nmse"] < 1.0 and 0 < m["l0"] <= 4 and m["final_loss"] > 0
    manifest = json.loads(a.manifest("saes").read_text())
    assert "artifacts/saes/L0.resid_pre/sae_weights.safetensors" in manifest["files"]
    assert "metrics/saes.json" in manifest["files"]
    for f in list(a.saes_dir.rglob("*")) + [a.metrics("saes"), a.manifest("saes")]:
        if f.is_file():
            assert str(a.root).encode() not in f.read_bytes()  # no absolute paths


def test_training_corpus_is_disjoint_from_eval_and_selection(tiny_params_raw):
    from sasgate.toy import grammar

    params = _params(tiny_params_raw)
    texts = sae_io.training_corpus(params)
    assert len(texts) == 200 and texts == sae_io.training_corpus(params)
    parts = grammar.partition_pairs(params.eval.seed, params.eval.n_eval, params.eval.n_selection,
                                    params.model.toy.n_validation)
    padded = [f" {t} " for t in texts]
    for split in ("eval", "selection", "validation"):
        for pair in parts[split]:
            assert not any(f" {pair.phrase} " in t for t in padded), (split, pair.phrase)
    used = {p.phrase for p in parts["train"] if any(f" {p.phrase} " in t for t in padded)}
    assert len(used) > 20  # the corpus really is built from the train pairs
    assert all(t.startswith("<user> ") and " <eoi> <assistant> " in t for t in texts)


def test_collected_training_tokens_exclude_bos_and_pads(trained, tiny_toy_dir):
    from sasgate.modeling import toy_model_from_dir

    chat = toy_model_from_dir(tiny_toy_dir)
    texts = ["<user> how do i rob the bank ? <eoi> <assistant> i cannot help with that .", "<user> hi <eoi> <assistant>"]
    acts = sae_io.collect_training_activations(chat, texts, ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"]
    lengths = [len(chat.codec.encode(t)) for t in texts]  # without BOS
    assert acts.shape == (sum(lengths), 32)
    alone = sae_io.collect_training_activations(chat, texts[1:], ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"]
    assert torch.allclose(acts[lengths[0]:], alone, atol=1e-5)  # padding of the shorter row changed nothing


def test_path_spec_loads_through_the_stage(trained, tmp_path, tiny_params_raw):
    from sasgate.stages import saes

    _p, (a, _b) = trained
    src_dir = tmp_path / "external"
    for key in ("L0.resid_pre", "L1.resid_post"):
        shutil.copytree(a.sae_dir(key), src_dir / key)
        (src_dir / key / "source.json").unlink()
    raw = copy.deepcopy(tiny_params_raw)
    raw["tuples"] = [{"layer": 0, "site": "resid_pre", "sae": "path:external/L0.resid_pre"},
                     {"layer": 1, "site": "resid_post", "sae": f"path:{src_dir / 'L1.resid_post'}"}]
    paths = Paths.at(tmp_path)
    saes.run(parse_params(raw), paths)  # no model needed: nothing to train
    for tp in parse_params(raw).tuples:
        src = json.loads((paths.sae_dir(tp.key) / "source.json").read_text())
        assert src["kind"] == "path" and src["checks"]["hook_match"] == "exact"
        orig = src_dir / tp.key
        assert src["origin"]["source_files"] == {n: "sha256:" + d for n, d in _digests(orig).items()}
        loaded, _ = sae_io.load_tuple_sae(paths, tp)
        original = sae_io.load_sae_dir(orig)
        for name, tensor in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor)
    metrics = json.loads(paths.metrics("saes").read_text())
    assert metrics["tuples"]["L0.resid_pre"]["kind"] == "path"


def test_path_spec_wrong_hook_or_width_is_refused(trained, tmp_path, tiny_params_raw):
    from sasgate.stages import saes

    _p, (a, _b) = trained
    raw = copy.deepcopy(tiny_params_raw)
    raw["tuples"] = [{"layer": 1, "site": "resid_post", "sae": f"path:{a.sae_dir('L0.resid_pre')}"}]
    with pytest.raises(ParamsError, match="trained on hook blocks.0.hook_resid_pre, but the tuple reads "
                                          "blocks.1.hook_resid_post"):
        saes.run(parse_params(raw), Paths.at(tmp_path))
    raw["model"]["toy"]["d_model"] = 64
    with pytest.raises(ParamsError, match="d_in = 32, but model toy-refusal has d_model = 64"):
        saes.run(parse_params(raw), Paths.at(tmp_path))
    assert not (tmp_path / "artifacts" / "saes").exists()  # nothing half-written


def test_hook_equivalence():
    from sasgate.params import TupleParams

    pre = TupleParams(layer=3, site="resid_pre")
    assert sae_io._hook_match("blocks.3.hook_resid_pre", pre) == "exact"
    assert sae_io._hook_match("blocks.2.hook_resid_post", pre) == "equivalent"
    assert sae_io._hook_match("blocks.3.hook_resid_post", pre) == "mismatch"
    assert sae_io._hook_match(None, pre) == "unknown"
    assert sae_io._hook_match("blocks.4.hook_resid_pre", TupleParams(layer=3, site="resid_post")) == "equivalent"


def _sae_copy(trained, tmp_path) -> Path:
    _p, (a, _b) = trained
    d = tmp_path / "sae"
    shutil.copytree(a.sae_dir("L0.resid_pre"), d)
    return d


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights_are_a_clear_artifact_error(trained, tmp_path, damage):
    d = _sae_copy(trained, tmp_path)
    w = d / "sae_weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(b"\x00not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"corrupt SAE weights .*sae_weights\.safetensors"):
        sae_io.load_sae_dir(d)


def test_corrupt_or_missing_config(trained, tmp_path):
    d = _sae_copy(trained, tmp_path)
    (d / "cfg.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="corrupt artifact .*cfg.json"):
        sae_io.load_sae_dir(d)
    (d / "cfg.json").unlink()
    with pytest.raises(ArtifactError, match="cfg.json is missing"):
        sae_io.load_sae_dir(d)
    with pytest.raises(ArtifactError, match="missing SAE folder"):
        sae_io.load_sae_dir(tmp_path / "nowhere")


def test_tampered_tuple_folder_is_refused(trained, tmp_path):
    params, (a, _b) = trained
    root = tmp_path / "copy"
    shutil.copytree(a.saes_dir, root / "artifacts" / "saes")
    paths = Paths.at(root)
    w = paths.sae_dir("L0.resid_pre") / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(ArtifactError, match="does not match the sha256 recorded in source.json"):
        sae_io.load_tuple_sae(paths, params.tuples[0])


def test_pickle_in_sae_folder_is_refused(trained, tmp_path):
    d = _sae_copy(trained, tmp_path)
    (d / "ae.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ArtifactError, match=r"pickle file\(s\) \['ae.pt'\]"):
        sae_io.load_sae_dir(d)


def test_hub_pickles_are_refused_before_download():
    hub = sae_io._PinnedHub(REV)
    with pytest.raises(ArtifactError, match="pickle format"):
        hub.download("someone/sae", "layer_3/ae.pt")
    with pytest.raises(ArtifactError, match="pickle format"):
        hub.download("someone/sae", "final.PTH", subfolder="ckpt")
    assert hub.fetched == {}
    # a registry release stored as a .pt is refused by name, before any Hub access
    with pytest.raises(ArtifactError, match="a pickle; sasgate refuses pickles"):
        sae_io.fetch_sae_lens("deepseek-r1-distill-llama-8b-qresearch", "blocks.19.hook_resid_post", REV)


def test_pinned_hub_blocks_torch_load_and_restores():
    from sae_lens.loading import pretrained_sae_loaders as loaders

    original = loaders.hf_hub_download
    with sae_io.pinned_hub(REV) as hub:
        assert loaders.hf_hub_download == hub.download
        with pytest.raises(ArtifactError, match="torch.load"):
            torch.load("anything.pt")
    assert loaders.hf_hub_download is original and torch.load is not sae_io._no_torch_load


def test_unknown_release_or_id_is_a_params_error():
    with pytest.raises(ParamsError, match="not in the installed sae-lens registry"):
        sae_io.fetch_sae_lens("no-such-release", "x", REV)
    with pytest.raises(ParamsError, match="not in sae-lens release 'gpt2-small-res-jb'"):
        sae_io.fetch_sae_lens("gpt2-small-res-jb", "blocks.99.nothing", REV)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with an empty cache of our own (huggingface_hub reads both at import)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_sae(cache: Path, repo: str, folder: str, rev: str, sae) -> Path:
    """Place an SAE in sae-lens disk format in the HF cache layout, as a download at `rev` would."""
    target = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / rev / folder
    sae.save_model(str(target))
    return target


def _tiny_standard_sae(d_in: int, hook: str, model: str):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=8, metadata=SAEMetadata(hook_name=hook, model_name=model)))


@pytest.mark.parametrize("spec", ["hf", "sae_lens"])
def test_offline_without_cache_fails_fast_and_clearly(offline_hub, spec):
    start = time.monotonic()
    with pytest.raises(ArtifactError) as info:
        if spec == "hf":
            sae_io.fetch_hf_folder("someone/saes", "layer_1", REV)
        else:
            sae_io.fetch_sae_lens("gpt2-small-res-jb", "blocks.0.hook_resid_pre", REV)
    msg = str(info.value)
    assert "HF_HUB_OFFLINE=1" in msg and REV in msg and "cfg.json" in msg
    assert time.monotonic() - start < 30


def test_hf_folder_loads_at_the_pinned_revision_only(offline_hub):
    sae = _tiny_standard_sae(16, "blocks.1.hook_resid_post", "toy-refusal")
    folder = _cache_sae(offline_hub, "someone/saes", "l1/post", REV, sae)
    loaded, origin = sae_io.fetch_hf_folder("someone/saes", "l1/post", REV)
    assert torch.equal(loaded.W_dec, sae.W_dec) and loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert origin["source_files"] == {f"l1/post/{n}": "sha256:" + d for n, d in _digests(folder).items()}
    with pytest.raises(ArtifactError, match=OTHER_REV):  # only that commit is in the cache: the pin is used
        sae_io.fetch_hf_folder("someone/saes", "l1/post", OTHER_REV)


def test_sae_lens_release_loads_through_its_converter_at_the_pin(offline_hub):
    sae = _tiny_standard_sae(768, "blocks.0.hook_resid_pre", "gpt2-small")
    folder = _cache_sae(offline_hub, "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.0.hook_resid_pre", REV, sae)
    loaded, origin = sae_io.fetch_sae_lens("gpt2-small-res-jb", "blocks.0.hook_resid_pre", REV)
    assert torch.equal(loaded.W_enc, sae.W_enc) and loaded.cfg.d_in == 768
    assert origin["repo"] == "jbloom/GPT2-Small-SAEs-Reformatted" and origin["conversion"] == "sae_lens"
    # the registry's config overrides reached the SAE: it expects a processed gpt2 (on record in source.json)
    assert origin["model_from_pretrained_kwargs"] == {"center_writing_weights": True}
    assert set(origin["source_files"]) == {"blocks.0.hook_resid_pre/cfg.json",
                                           "blocks.0.hook_resid_pre/sae_weights.safetensors"}
    assert origin["source_files"]["blocks.0.hook_resid_pre/sae_weights.safetensors"] == (
        "sha256:" + _digests(folder)["sae_weights.safetensors"])
    with pytest.raises(ArtifactError, match="HF_HUB_OFFLINE"):
        sae_io.fetch_sae_lens("gpt2-small-res-jb", "blocks.0.hook_resid_pre", OTHER_REV)
