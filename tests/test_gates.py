"""The gate record schema (ARCHITECTURE.md §5 "Gate records"): typed, versioned, validated on read."""

from __future__ import annotations

import copy
import json

import pytest

from sasgate.errors import ArtifactError
from sasgate.gates import GATE_SCHEMA, GateRecord, compare, input_digests, read_gate, validate_gate, write_gate

DIGEST = "sha256:" + "ab" * 32


def record() -> dict:
    return {
        "schema": GATE_SCHEMA, "gate": "reconstruction", "status": "fail", "metric": "nmse",
        "threshold": 0.12, "comparison": "<=",
        "per_tuple": [{"tuple": {"model": "toy-refusal", "layer": 1, "site": "resid_post"},
                       "observed": 0.163, "ci95": [0.158, 0.169], "status": "fail", "extra": {"cosine": 0.9}}],
        "inputs": {"artifacts/saes/L1.resid_post/sae_weights.safetensors": DIGEST},
        "params": {"reconstruction": {"threshold": 0.12}},
        "reason": "nMSE above threshold on 1/1 required tuples",
    }


def test_round_trip_is_canonical_and_validated(tmp_path):
    path = tmp_path / "gates" / "reconstruction.json"
    rec = write_gate(path, record())
    assert isinstance(rec, GateRecord)
    first = path.read_bytes()
    back = read_gate(path, gate="reconstruction")
    assert back == rec and back.per_tuple[0].ci95 == (0.158, 0.169)
    write_gate(path, back)
    assert path.read_bytes() == first  # same record, same bytes
    raw = json.loads(first)
    assert raw["schema"] == GATE_SCHEMA and list(raw) == sorted(raw)  # key `schema`, sorted keys


def test_example_from_design_doc_validates_and_other_gates_reuse_it():
    rec = validate_gate(record())
    assert rec.status == "fail" and rec.per_tuple[0].extra == {"cosine": 0.9}
    later = record() | {"gate": "remediation", "status": "not_needed", "threshold": None, "comparison": None,
                        "metric": "coverage", "per_tuple": [], "details": {"stop_rule": None}}
    assert validate_gate(later).status == "not_needed"


@pytest.mark.parametrize("where", ["top", "tuple", "tuple_ref"])
def test_unknown_fields_are_rejected(where):
    raw = record()
    target = {"top": raw, "tuple": raw["per_tuple"][0], "tuple_ref": raw["per_tuple"][0]["tuple"]}[where]
    target["surprise"] = 1
    with pytest.raises(ArtifactError, match="unknown field .*surprise"):
        validate_gate(raw)


@pytest.mark.parametrize("field", ["status", "reason", "inputs", "params", "per_tuple", "threshold", "metric"])
def test_missing_fields_are_rejected(field):
    raw = record()
    del raw[field]
    with pytest.raises(ArtifactError, match=f"missing field '{field}'"):
        validate_gate(raw)


def test_missing_per_tuple_field_is_rejected():
    raw = record()
    del raw["per_tuple"][0]["ci95"]
    with pytest.raises(ArtifactError, match="missing field 'per_tuple.0.ci95'"):
        validate_gate(raw)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(schema="sasgate.gate/1"), "schema is 'sasgate.gate/1'"),
    (lambda r: r.update(status="maybe"), "status"),
    (lambda r: r["per_tuple"][0].update(ci95=[0.2, 0.1]), "lo <= hi"),
    (lambda r: r.update(inputs={"/abs/path": DIGEST}), "relative to the project root"),
    (lambda r: r.update(inputs={"../outside": DIGEST}), "relative to the project root"),
    (lambda r: r.update(inputs={"artifacts/x": "md5:abc"}), "sha256:<64 lowercase hex>"),
    (lambda r: r.update(comparison=None), "both be set or both be null"),
])
def test_invalid_values_are_rejected(mutate, message):
    raw = record()
    mutate(raw)
    with pytest.raises(ArtifactError, match=message):
        validate_gate(raw)


def test_read_missing_corrupt_and_wrong_gate(tmp_path):
    with pytest.raises(ArtifactError, match="missing artifact"):
        read_gate(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "sasgate.gate/1", "gate": ')
    with pytest.raises(ArtifactError, match="corrupt artifact"):
        read_gate(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected a JSON object"):
        read_gate(bad)
    good = tmp_path / "good.json"
    write_gate(good, record())
    with pytest.raises(ArtifactError, match="holds the 'reconstruction' gate, expected 'behaviour'"):
        read_gate(good, gate="behaviour")


def test_write_refuses_an_invalid_record(tmp_path):
    raw = copy.deepcopy(record())
    raw["extra_top_level"] = True
    path = tmp_path / "g.json"
    with pytest.raises(ArtifactError):
        write_gate(path, raw)
    assert not path.exists()


def test_compare_and_input_digests(tmp_path):
    assert compare(0.12, "<=", 0.12) and not compare(0.1200001, "<=", 0.12)
    assert compare(0.9, ">=", 0.8) and not compare(0.8, "<", 0.8)
    f = tmp_path / "artifacts" / "a.bin"
    f.parent.mkdir()
    f.write_bytes(b"abc")
    assert input_digests(tmp_path, [f]) == {
        "artifacts/a.bin": "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    with pytest.raises(ArtifactError, match="missing gate input"):
        input_digests(tmp_path, [tmp_path / "missing"])


def _with_metrics(**row) -> dict:
    raw = record()
    raw["per_tuple"][0].update(row)
    return raw


CRIT = {"metric": "kl_div_score", "comparison": ">=", "threshold": 0.99, "observed": 0.97, "pass": False}


def test_rows_without_metrics_keep_their_bytes_and_rows_with_them_round_trip(tmp_path):
    plain = write_gate(tmp_path / "a.json", record())
    assert "metrics" not in json.loads((tmp_path / "a.json").read_text())["per_tuple"][0]
    assert plain.per_tuple[0].metrics is None and plain.per_tuple[0].criteria is None
    rec = write_gate(tmp_path / "b.json", _with_metrics(metrics={"nmse": 0.163, "kl_div_score": 0.97}, criteria=[CRIT]))
    row = json.loads((tmp_path / "b.json").read_text())["per_tuple"][0]
    assert row["criteria"] == [CRIT] and row["metrics"] == {"kl_div_score": 0.97, "nmse": 0.163}
    assert rec.per_tuple[0].criteria[0].passed is False


@pytest.mark.parametrize("row, named", [
    ({"metrics": {"kl_div_score": float("inf")}}, "metrics"),
    ({"metrics": {"kl_div_score": None}}, "metrics"),
    ({"metrics": {"": 1.0}}, "metrics"),
    ({"criteria": [{**CRIT, "pass": "no"}]}, "criteria"),
    ({"criteria": [{**CRIT, "comparison": "=="}]}, "criteria"),
    ({"criteria": [{k: v for k, v in CRIT.items() if k != "observed"}]}, "observed"),
    ({"criteria": [{**CRIT, "why": "trust me"}]}, "why"),
    ({"criteria": [{**CRIT, "observed": float("nan")}]}, "observed"),
])
def test_metrics_and_criteria_are_typed(row, named):
    with pytest.raises(ArtifactError, match=named):
        validate_gate(_with_metrics(**row))
