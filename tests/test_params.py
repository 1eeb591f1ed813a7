"""params.yaml schema and `sasgate params check`: every bad input names its key."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sasgate.cli import main
from sasgate.errors import ParamsError
from sasgate.params import load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def default_raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def check(tmp_path, raw):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    return CliRunner().invoke(main, ["params", "check", str(f)])


def test_shipped_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert len(p.tuples) == 4  # the study's four required tuples


def test_check_accepts_default(tmp_path):
    res = check(tmp_path, default_raw())
    assert res.exit_code == 0, res.output
    assert "4 required tuples" in res.output


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["reconstruction"].__setitem__("treshold", 0.2), "unknown key 'reconstruction.treshold'"),
        (lambda r: r.__setitem__("colect", {}), "unknown key 'colect'"),
        (lambda r: r["collect"].__setitem__("batch_size", "32"), "collect.batch_size = '32'"),
        (lambda r: r["reconstruction"].__setitem__("threshold", -0.1), "reconstruction.threshold = -0.1"),
        (lambda r: r["tuples"][2].__setitem__("layer", 9), "tuples[2].layer = 9 is beyond the model's depth"),
        (lambda r: r["tuples"][0].__setitem__("site", "resid"), "tuples[0].site = 'resid'"),
        (lambda r: r["tuples"][0].__setitem__("sae", "sae_lens:gemma-scope/layer_1"), "tuples[0].sae"),
        (lambda r: r["model"].__setitem__("name", "google/gemma-2-2b-it"), "model.revision must be a 40-hex"),
        (lambda r: r["model"]["toy"].__setitem__("n_heads", 5), "divisible by n_heads"),
        (lambda r: r["model"].update(name="acme/not-a-model", revision="a" * 40, n_layers=2, chat_template="x"),
         "neither 'toy-refusal', 'local' nor a transformer-lens official model name"),
        (lambda r: r["tuples"].append(dict(r["tuples"][0])), "repeats L1.resid_pre"),
        (lambda r: r["reconstruction"].__setitem__("criteria", [{"metric": "kl_score", "comparison": ">=",
                                                                 "threshold": 0.9}]),
         "reconstruction.criteria[0].metric = 'kl_score'"),
        (lambda r: r["reconstruction"].__setitem__("criteria", [{"metric": "kl_div_score", "comparison": "==",
                                                                 "threshold": 0.9}]),
         "reconstruction.criteria[0].comparison = '=='"),
        (lambda r: r["reconstruction"].__setitem__("criteria", [{"metric": "kl_div_score", "comparison": ">="}]),
         "missing key 'reconstruction.criteria[0].threshold'"),
        (lambda r: r["reconstruction"].__setitem__("criteria", [{"metric": "kl_div_score", "comparison": ">=",
                                                                 "threshold": float("nan")}]),
         "reconstruction.criteria[0].threshold = nan: not a finite number"),
        (lambda r: r["reconstruction"].__setitem__("criteria", [{"metric": "l0", "comparison": "<=", "threshold": 8},
                                                                {"metric": "l0", "comparison": "<=", "threshold": 9}]),
         "reconstruction.criteria: repeats a (metric, comparison)"),
    ],
)
def test_check_rejects_and_names_the_key(tmp_path, mutate, expected):
    raw = default_raw()
    mutate(raw)
    res = check(tmp_path, raw)
    assert res.exit_code == 2
    assert expected in res.output


def test_check_missing_file_and_bad_yaml(tmp_path):
    res = CliRunner().invoke(main, ["params", "check", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "not found" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    res = CliRunner().invoke(main, ["params", "check", str(bad)])
    assert res.exit_code == 2 and "not valid YAML" in res.output


def test_json_output_fills_defaults(tmp_path):
    raw = default_raw()
    del raw["collect"]
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(main, ["params", "check", "--json", str(f)])
    assert res.exit_code == 0
    assert '"max_new_tokens": 12' in res.output


def test_hub_model_fully_pinned_is_accepted():
    raw = default_raw()
    raw["model"] = {"name": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "a" * 40, "n_layers": 24,
                    "chat_template": "chatml"}
    raw["eval"] = {"source": "builtin"}
    raw["tuples"] = [{"layer": 23, "site": "resid_post", "sae": "path:/tmp/sae"}]
    assert parse_params(raw).model.depth == 24
    raw["tuples"][0]["layer"] = 24
    with pytest.raises(ParamsError, match="beyond the model's depth"):
        parse_params(raw)


def test_every_command_has_help():
    runner = CliRunner()
    for args in ([], ["params"], ["params", "check"], ["lock"]):
        res = runner.invoke(main, [*args, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output, args


# --- non-finite numbers and duplicate keys (issue 13) ------------------------------------------


@pytest.mark.parametrize("mutate, named", [
    (lambda r: r["reconstruction"].__setitem__("threshold", float("inf")), "reconstruction.threshold = inf"),
    (lambda r: r["steer"].__setitem__("add_coefficients", [0.5, float("-inf")]), "steer.add_coefficients[1] = -inf"),
    (lambda r: r["watch"].__setitem__("timeout_s", float("inf")), "watch.timeout_s = inf"),
    (lambda r: r["directions"].__setitem__("induce_threshold", float("nan")), "directions.induce_threshold = nan"),
])
def test_non_finite_numbers_are_refused_anywhere(tmp_path, mutate, named):
    """Each passes its field's bounds (inf >= 0, nan is a float): the old schema accepted all of them."""
    raw = default_raw()
    mutate(raw)
    res = check(tmp_path, raw)  # yaml.safe_dump writes them as .inf / -.inf / .nan
    assert res.exit_code == 2, res.output
    assert f"{named}: not a finite number" in res.output


@pytest.mark.parametrize("text, named", [
    ("reconstruction:\n  threshold: 0.12\n  threshold: 0.5\n", "duplicate key 'reconstruction.threshold' on lines 2 and 3"),
    ("validity:\n  margin: 0.1\nvalidity:\n  margin: 0.3\n", "duplicate key 'validity' on lines 1 and 3"),
    ("tuples:\n  - layer: 1\n    site: resid_pre\n    layer: 3\n", "duplicate key 'tuples[0].layer' on lines 2 and 4"),
])
def test_a_key_named_twice_is_refused_naming_it_and_both_lines(tmp_path, text, named):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    res = CliRunner().invoke(main, ["params", "check", str(f)])
    assert res.exit_code == 2 and named in res.output, res.output
    assert yaml.safe_load(text)  # PyYAML alone keeps the last value silently


def test_merge_keys_and_aliases_are_not_duplicates():
    from sasgate.artifacts import parse_yaml

    text = "base: &b {k: 1, j: 2}\nover:\n  <<: *b\n  k: 3\nagain: *b\n"
    assert parse_yaml(text) == {"base": {"k": 1, "j": 2}, "over": {"k": 3, "j": 2}, "again": {"k": 1, "j": 2}}
    assert parse_yaml("") is None


@pytest.mark.slow
def test_an_infinite_threshold_stops_dvc_repro_before_any_gate_record_is_touched(reproduced_small, tmp_path):
    """The old schema let `.inf` through to the reconstruction stage, after DVC had deleted its gate record."""
    from projects import copy_project, dvc

    root = copy_project(reproduced_small, tmp_path / "p")
    gate = (root / "gates" / "reconstruction.json").read_bytes()
    params = (root / "params.yaml").read_text()
    assert "threshold: 0.12" in params
    (root / "params.yaml").write_text(params.replace("threshold: 0.12", "threshold: .inf", 1))
    res = dvc(root, "repro", check=False)
    assert res.returncode != 0
    assert "reconstruction.threshold = inf: not a finite number" in res.stdout + res.stderr
    assert "Running stage 'reconstruction'" not in res.stdout
    assert (root / "gates" / "reconstruction.json").read_bytes() == gate
