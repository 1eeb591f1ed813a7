"""The coverage matcher shared by `sasgate watch` and remediation, and the registry read (`--registry-only`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sasgate.params import SaeConstraintParams, parse_params
from sasgate.paths import Paths
from sasgate.watch import coverage, layouts
from sasgate.watch.coverage import Required, match
from sasgate.watch.descriptors import SaeDescriptor, Skipped

REPO = Path(__file__).resolve().parents[1]
IT = "google/gemma-2-2b-it"


def sae(layer: int, site: str, model: str = "gemma-2-2b", **kw) -> SaeDescriptor:
    hook = f"blocks.{layer}.hook_{site}"
    return SaeDescriptor(source="hub", layout="sae_lens", repo="org/saes", revision="a" * 40, path=hook, model=model,
                         hook_name=hook, hook_source="cfg.json", layer=layer, site=site, **kw)


def test_resid_pre_of_layer_l_is_resid_post_of_layer_l_minus_1_and_the_match_says_so():
    req = [Required("gemma-2-2b", 6, "resid_pre"), Required("gemma-2-2b", 5, "resid_post"),
           Required("gemma-2-2b", 0, "resid_pre"), Required("gemma-2-2b", 7, "resid_post")]
    report = match(req, [sae(5, "resid_post"), sae(8, "resid_pre"), sae(3, "mlp_out")], SaeConstraintParams())
    t6, t5, t0, t7 = report.tuples
    assert [(m.descriptor.path, m.how) for m in t5.matches] == [("blocks.5.hook_resid_post", "same hook")]
    assert [m.descriptor.path for m in t6.matches] == ["blocks.5.hook_resid_post"]
    assert "resid_pre[l] = resid_post[l-1]" in t6.matches[0].how
    assert [m.descriptor.path for m in t7.matches] == ["blocks.8.hook_resid_pre"]
    assert t0.matches == [] and report.text == "3/4"  # no block -1: resid_pre[0] is the embedding
    assert [d.path for d in report.covering(req[0])] == ["blocks.5.hook_resid_post"]


def test_a_base_model_sae_does_not_cover_the_instruction_tuned_tuple_under_same_model_variant():
    req = [Required(IT, 5, "resid_post")]
    strict = match(req, [sae(5, "resid_post")], SaeConstraintParams(same_model_variant=True))
    assert strict.text == "0/1"
    (d, reason), = strict.tuples[0].excluded
    assert reason == ("trained on the base model gemma-2-2b (= google/gemma-2-2b); the tuple names the "
                      "instruction-tuned model google/gemma-2-2b-it (same_model_variant)")
    assert any("same_model_variant" in s for s in strict.skipped)
    loose = match(req, [sae(5, "resid_post")], SaeConstraintParams(same_model_variant=False))
    assert loose.text == "1/1" and "base model" in loose.tuples[0].matches[0].flags[0]
    assert match(req, [sae(5, "resid_post", model=IT)], SaeConstraintParams()).text == "1/1"


@pytest.mark.parametrize("constraints, covered, reason", [
    ({"architectures": ["topk"]}, False, "architecture jumprelu is not one of ['topk']"),
    ({"architectures": ["jumprelu"]}, True, None),
    ({"min_width": 32768}, False, "width 16384 is below min_width 32768"),
    ({"max_width": 16384, "min_width": 4096}, True, None),
    ({"max_width": 8192}, False, "width 16384 is above max_width 8192"),
])
def test_architecture_and_width_constraints_decide_both_ways(constraints, covered, reason):
    report = match([Required("gemma-2-2b", 5, "resid_post")],
                   [sae(5, "resid_post", width=16384, architecture="jumprelu")], SaeConstraintParams(**constraints))
    assert report.covered == int(covered)
    if reason:
        assert report.tuples[0].excluded[0][1] == reason


def test_other_models_are_ignored_and_only_relevant_skips_are_reported():
    skips = [Skipped(where="a", reason="pickle", model="gemma-2-2b"), Skipped(where="b", reason="x", model="gpt2-small"),
             Skipped(where="c", reason="unknown layout")]
    report = match([Required("google/gemma-2-2b", 5, "resid_post")],
                   [sae(5, "resid_post", model="gpt2-small"), *skips], SaeConstraintParams())
    assert report.text == "0/1" and report.tuples[0].excluded == []
    assert report.skipped == ["a: pickle", "c: unknown layout"]


def test_layout_names():
    assert layouts.gemma_scope("layer_5/width_16k/average_l0_68", "res").width == 16384
    assert layouts.gemma_scope("layer_5/width_65k/average_l0_68", "res").width == 65536  # 2^16, not 65 x 1024
    assert layouts.gemma_scope_2("resid_post/layer_3_width_131k_l0_big").width == 131072
    assert layouts.gemma_scope("layer_5/width_100k/average_l0_68", "res").width is None  # not a published width
    assert layouts.gemma_scope("layer_5/width_1m/average_l0_68", "att").site == "attn_z"
    assert layouts.gemma_scope_2("resid_post_all/layer_3_width_262k_l0_big").layer == 3
    assert layouts.gemma_scope_2("transcoder/layer_3_width_16k_l0_big") is None
    assert (layouts.llama_scope("Llama3_1-8B-Base-L15M-8x").layer, layouts.llama_scope("x-L15M-8x").site) == \
        (15, "mlp_out")
    assert layouts.gemma_scope_repo_model("google/gemma-scope-9b-it-res") == ("gemma-2-9b-it", "res")
    assert layouts.gemma_scope_2_repo_model("google/gemma-scope-2-270m-pt") == "google/gemma-3-270m-pt"


def test_local_family_reads_sae_lens_folders_and_skips_pickles(tmp_path):
    cfg = {"architecture": "topk", "d_sae": 64, "metadata": {"model_name": "toy-refusal",
                                                              "hook_name": "blocks.0.hook_resid_post"}}
    for name, weights in (("good", "sae_weights.safetensors"), ("pickled", "sae_weights.pt")):
        (tmp_path / "saes" / name).mkdir(parents=True)
        (tmp_path / "saes" / name / "cfg.json").write_text(json.dumps(cfg))
        (tmp_path / "saes" / name / weights).write_bytes(b"x")
    params = parse_params({"tuples": [{"layer": 1, "site": "resid_pre"}],
                           "remediation": {"families": {"A": {"source": "local", "dir": "saes"}}}})
    items, how = coverage.descriptors_for("local", params, Paths.at(tmp_path), params.remediation.families["A"])
    report = match(coverage.required(params), items, params.remediation.constraints)
    assert report.text == "1/1" and how == "local SAE folders under saes"
    assert [d.spec for d in report.covering(coverage.required(params)[0])] == ["path:saes/good"]
    assert report.skipped == ["local:saes/pickled: weights only as pickle (sae_weights.pt)"]


def test_registry_only_on_the_gemma_preset_reports_coverage_tuple_by_tuple(tmp_path):
    """The installed registry has Gemma Scope for the *base* gemma-2-2b: under same_model_variant
    none of it covers the -it tuples, and each tuple says so. No network: HF_HUB_OFFLINE and a dead endpoint."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "sasgate.cli", "watch", "--registry-only", "--json", "--params",
                          str(REPO / "configs" / "gemma-2-2b-it.yaml"), "--state", str(tmp_path / "s.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert list(report["sources"]) == ["registry"] and report["coverage"]["text"] == "0/4"
    for t, layer in zip(report["coverage"]["per_tuple"], (5, 10, 15, 20)):
        assert t["key"] == f"L{layer}.resid_post" and t["covering"] == []
        labels = {e["label"]: e["reason"] for e in t["excluded"]}
        canonical = f"gemma-scope-2b-pt-res-canonical/layer_{layer}/width_16k/canonical"
        assert "trained on the base model gemma-2-2b" in labels[canonical]
        assert "instruction-tuned model google/gemma-2-2b-it (same_model_variant)" in labels[canonical]


def test_every_gemma_scope_width_label_in_the_registry_is_a_published_power_of_two():
    """The labels the installed registry uses are exactly the ones the table reads, and each names its power of
    two in thousands (millions for m), rounded down: 65k = 65536 = 2^16, 131k = 2^17, 1m = 2^20."""
    import re

    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    labels = {m[1] for lookup in get_pretrained_saes_directory().values() if lookup.release.startswith("gemma-scope")
              for path in lookup.saes_map.values() if (m := re.search(r"width_(\w+?)(?:/|_l0)", path))}
    assert labels == set(layouts.GEMMA_SCOPE_WIDTHS), labels
    for label, width in layouts.GEMMA_SCOPE_WIDTHS.items():
        unit = 1_000_000 if label.endswith("m") else 1000
        assert width & (width - 1) == 0 and width // unit == int(label[:-1]), label
    from sasgate.watch.registry import read_registry

    found, _, _ = read_registry()
    widths = {d.width for d in found if d.release and d.release.startswith("gemma-scope") and d.width}
    assert 65536 in widths and 66560 not in widths and widths <= set(layouts.GEMMA_SCOPE_WIDTHS.values())


@pytest.mark.parametrize("max_width, covered", [(65536, True), (65535, False)])
def test_a_65k_gemma_scope_sae_meets_max_width_65536_and_not_below(max_width, covered):
    named = layouts.gemma_scope("layer_5/width_65k/average_l0_68", "res")
    report = match([Required("google/gemma-2-2b", 5, "resid_post")], [sae(5, "resid_post", width=named.width)],
                   SaeConstraintParams(max_width=max_width))
    assert report.covered == int(covered)
    if not covered:
        assert report.tuples[0].excluded[0][1] == "width 65536 is above max_width 65535"


def test_model_names_use_transformer_lens_alias_table_and_keep_the_owner():
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    from sasgate import model_names

    assert model_names._aliases() == make_model_alias_map()  # the table read by path is transformer-lens's own
    assert model_names.same_model("gpt2-small", "gpt2") and model_names.same_model("gemma-2-2b", "google/gemma-2-2b")
    assert not model_names.same_model("someorg/gemma-2-2b-it", "google/gemma-2-2b-it")
    assert not model_names.same_model("gemma-2-2b", "google/gemma-2-2b-it")  # the variant is part of the model
    assert model_names.family_relation("gemma-2-2b", "google/gemma-2-2b-it") == "same"
    assert model_names.family_relation("someorg/gemma-2-2b", "google/gemma-2-2b-it") == "owner"
    assert model_names.family_relation("gpt2", "google/gemma-2-2b") == "other"
    assert model_names.resolve("toy-refusal").resolved == "toy-refusal"  # unknown to the table: as written


def test_the_registry_own_gpt2_small_saes_cover_a_gpt2_tuple():
    """sae-lens registers its GPT-2 SAEs under `gpt2-small`; a tuple naming `gpt2` (the official name) is the same."""
    from sasgate.watch.registry import read_registry

    found, skipped, _ = read_registry()
    report = match([Required("gpt2", 8, "resid_pre")], [*found, *skipped], SaeConstraintParams())
    labels = [m.descriptor.label for m in report.tuples[0].matches]
    assert "gpt2-small-res-jb/blocks.8.hook_resid_pre" in labels, labels[:5]
    assert {m.descriptor.model for m in report.tuples[0].matches} >= {"gpt2-small"}


def test_watch_help_states_every_exit_code_and_the_rules():
    from click.testing import CliRunner

    from sasgate.cli import main

    res = CliRunner().invoke(main, ["watch", "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for line in ("0 polled;", "10 the reopen condition is met and not yet reported", "75 the Hub could not be read",
                 "a request stalled past watch.timeout_s", "is a skip, read again on every poll, never a 75",
                 "2 usage or config error", "5 --evaluate without the project's eval activations",
                 "1 the report could not be written out", "aliases, owner included", "at most watch.timeout_s"):
        assert line in text, line
