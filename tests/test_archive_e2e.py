"""End-to-end: export a real (small) pipeline run, verify it, tamper with it, re-run it.

The project is a private copy of the session's `reproduced_small` (tests/conftest.py: SMALL
params, real git + one `dvc repro`); one `--reproduce` re-run is shared by the tests that read it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from projects import REPO, copy_project, sh
from sasgate.archive import bundle, dsse, keys
from sasgate.archive.dvcmeta import read_pipeline
from sasgate.archive.export import export, predicate_for
from sasgate.archive.reproduce import _sh, _within_tolerance, compare
from sasgate.archive.safe_extract import iter_members
from sasgate.archive.verify import verify
from sasgate.artifacts import canonical_json, iter_files
from sasgate.cli import main
from sasgate.errors import NotVerifiedError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(reproduced_small, tmp_path_factory) -> Path:
    """A copy of the shared reproduced project: the export-refusal tests change files in it (and restore them)."""
    return copy_project(reproduced_small, tmp_path_factory.mktemp("archive") / "proj")


@pytest.fixture(scope="module")
def keypair(tmp_path_factory) -> keys.KeyPair:
    return keys.generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundle_path(built, keypair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "result.tar.gz"
    res = CliRunner().invoke(main, ["archive", "export", "--key", str(keypair.private_path), "--out", str(out),
                                    "--root", str(built), "--signer", "archive test"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def members(bundle_path) -> dict[str, bytes]:
    return {m.name: m.stream.read() for m in iter_members(bundle_path)}


def test_export_then_verify_is_verified(bundle_path, keypair, built):
    res = CliRunner().invoke(main, ["archive", "verify", str(bundle_path), "--key", str(keypair.public_path)])
    assert res.exit_code == 0, res.output
    decision = json.loads((built / "decision.json").read_text())
    assert res.output.startswith(f"VERIFIED {bundle_path}")
    assert f"signed by: {keypair.fingerprint}" in res.output and "'archive test'" in res.output
    assert f"decision: {decision['decision_state']} (active path {decision['active_path']}" in res.output
    for heading in ("we can claim:", "we cannot claim:", "reopen condition:", "large artifacts:"):
        assert heading in res.output


def test_exporting_twice_gives_identical_bytes(bundle_path, built, keypair, tmp_path):
    again = export(built, keypair.private_path, tmp_path / "again.tar.gz", signer="archive test")
    assert again.out.read_bytes() == bundle_path.read_bytes()


def test_bundle_contents(members, built):
    names = set(members)
    tracked = sh(["git", "ls-files"], built).stdout.split()
    assert set(tracked) <= names  # the source, data, preregistration, configs
    for name in ("params.yaml", "dvc.yaml", "dvc.lock", "decision.json", "CLAIMS.md", "data/eval.lock",
                 "data/scorer_check.jsonl", "data/scorer_check.lock", "preregistration/stop_rules.yaml",
                 "preregistration/lock.json", "ro-crate-metadata.json", bundle.ENVIRONMENT, bundle.BUNDLE_INFO,
                 bundle.ENVELOPE):
        assert name in names, name
    assert {f"gates/{g}.json" for g in ("behaviour", "stability", "reconstruction", "remediation")} <= names
    small_outs = [o.path for s in read_pipeline(built) for o in s.outs if not o.cached]
    assert any(p.startswith("plots/") for p in small_outs) and any(p.startswith("metrics/") for p in small_outs)
    for out in small_outs:  # every gate record, manifest, metric, plot, decision.json, CLAIMS.md
        on_disk = [f.relative_to(built).as_posix() for f in iter_files(built / out)]
        assert on_disk and set(on_disk) <= names, out
    assert not any(n.startswith("artifacts/") and n.endswith(".safetensors") for n in names)  # listed, not included
    assert {"artifacts/collect/items.jsonl", "artifacts/model/config.json"} <= names  # records travel
    info = json.loads(members[bundle.BUNDLE_INFO])
    head = sh(["git", "rev-parse", "HEAD"], built).stdout.strip()
    assert info["git"]["commit"] == head and isinstance(info["git"]["dirty"], bool)
    weights = {a["path"]: a for a in info["large_artifacts"]}["artifacts/model/model.safetensors"]
    data = (built / weights["path"]).read_bytes()
    assert (weights["sha256"], weights["md5"], weights["size"]) == \
        (hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest(), len(data))
    assert weights["out"] == "artifacts/model" and weights["out_md5"].endswith(".dir") and not weights["included"]
    env = json.loads(members[bundle.ENVIRONMENT])
    assert env["python"]["version"] and env["torch"]["version"] and env["packages"]["sasgate"] == "0.1.0"
    for name, data in members.items():  # no absolute paths of the exporting machine
        assert str(built).encode() not in data, name


def test_rocrate_describes_every_file_and_each_stage(members, built):
    from rocrate.rocrate import ROCrate

    crate_json = json.loads(members[bundle.CRATE])
    ROCrate(json.loads(members[bundle.CRATE]))  # the rocrate library reads it back
    graph = {e["@id"]: e for e in crate_json["@graph"]}
    for name, data in members.items():
        if name not in (bundle.CRATE, bundle.ENVELOPE):
            assert graph[name]["@type"] == "File" and graph[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
    for stage in read_pipeline(built):
        action = graph[f"#stage-{stage.name}"]
        assert action["@type"] == "CreateAction" and action["instrument"] == {"@id": "#sasgate"}
        results = {r["@id"] for r in action.get("result", [])}
        for out in stage.outs:
            assert any(r == out.path or r.startswith((out.path + "/", f"#dvc:{out.path}/")) for r in results), out.path


def test_show_is_labelled_unverified(bundle_path):
    res = CliRunner().invoke(main, ["archive", "show", str(bundle_path)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("UNVERIFIED")
    assert "[unverified] decision:" in res.output and "decision.json" in res.output


# --- tampering ------------------------------------------------------------------------------


def rebuild(members: dict[str, bytes], out: Path, resign_with=None, predicate: dict | None = None) -> Path:
    """Write members as a bundle; with a key, sign a fresh statement over them (a dishonest signer)."""
    members = dict(members)
    if resign_with is not None:
        old = json.loads(base64.b64decode(json.loads(members[bundle.ENVELOPE])["payload"]))
        digests = {n: hashlib.sha256(d).hexdigest() for n, d in members.items() if n != bundle.ENVELOPE}
        members[bundle.ENVELOPE] = dsse.sign(dsse.make_statement(digests, predicate or old["predicate"]), resign_with)
    bundle.write_bundle(out, [bundle.Entry(n, hashlib.sha256(d).hexdigest(), data=d) for n, d in members.items()])
    return out


def reason(path: Path, pub: Path) -> str:
    with pytest.raises(NotVerifiedError) as exc:
        verify(path, keys.load_public(pub))
    return str(exc.value)


def test_changing_any_single_byte_of_any_member_is_caught(members, keypair, tmp_path):
    missed = []
    for name, data in sorted(members.items()):
        changed = bytearray(data) or bytearray(b"\0")
        changed[len(changed) // 2] ^= 0x01
        path = rebuild({**members, name: bytes(changed)}, tmp_path / "t.tar.gz")
        why = reason(path, keypair.public_path)
        if not why.startswith(name):
            missed.append((name, why))
    assert missed == []


def test_removed_or_added_member_is_named(members, keypair, tmp_path):
    removed = {n: d for n, d in members.items() if n != "gates/reconstruction.json"}
    assert reason(rebuild(removed, tmp_path / "r.tar.gz"), keypair.public_path).startswith(
        "gates/reconstruction.json: listed in the signed statement but missing")
    added = {**members, "gates/extra.json": b"{}"}
    assert reason(rebuild(added, tmp_path / "a.tar.gz"), keypair.public_path).startswith(
        "gates/extra.json: present in the bundle but not listed")


def test_another_keys_signature_is_refused(members, keypair, tmp_path, bundle_path):
    other = keys.generate(tmp_path / "other")
    swapped = rebuild(members, tmp_path / "s.tar.gz", resign_with=keys.load_private(other.private_path))
    res = CliRunner().invoke(main, ["archive", "verify", str(swapped), "--key", str(keypair.public_path)])
    assert res.exit_code == 1
    assert f"{bundle.ENVELOPE}: no signature verifies with the given key {keypair.fingerprint}" in res.output
    assert other.fingerprint in res.output
    # the statement still names the original signer: under other's key it is refused, naming both
    res = CliRunner().invoke(main, ["archive", "verify", str(swapped), "--key", str(other.public_path)])
    assert res.exit_code == 1, res.output
    assert f"names signer key '{keypair.fingerprint}', but it verified with the given key {other.fingerprint}" \
        in res.output
    # other signing as itself (bundle.json and the predicate name other) is other's bundle, and verifies as such
    info = json.loads(members[bundle.BUNDLE_INFO])
    info["signer"] = {"keyid": other.fingerprint, "name": "someone else"}
    own = {**members, bundle.BUNDLE_INFO: canonical_json(info).encode()}
    own_path = rebuild(own, tmp_path / "o.tar.gz", resign_with=keys.load_private(other.private_path),
                       predicate=predicate_for(json.loads(members["decision.json"]), info))
    res = CliRunner().invoke(main, ["archive", "verify", str(own_path), "--key", str(other.public_path)])
    assert res.exit_code == 0 and f"signed by: {other.fingerprint}" in res.output, res.output


def test_negative_tolerances_in_a_resigned_bundle_are_not_verified(members, keypair, tmp_path):
    info = json.loads(members[bundle.BUNDLE_INFO])
    info["tolerances"]["rtol"] = -0.5  # every re-run would then be "not reproduced", or with atol < 0 any
    edited = {**members, bundle.BUNDLE_INFO: canonical_json(info).encode()}
    why = reason(rebuild(edited, tmp_path / "t.tar.gz", keys.load_private(keypair.private_path)),
                 keypair.public_path)
    assert why.startswith(f"{bundle.BUNDLE_INFO}: invalid: tolerances.rtol: Input should be greater than or equal to 0")


@pytest.mark.parametrize("tamper", ["flipped byte", "re-signed decision edit"])
@pytest.mark.parametrize("exists", [False, True], ids=["absent workdir", "empty workdir"])
def test_verify_workdir_on_a_tampered_bundle_stays_absent_or_empty(members, keypair, tmp_path, monkeypatch,
                                                                   tamper, exists):
    """Members go to a private temp folder while checked; --workdir receives them only once verified."""
    import stat

    from sasgate.archive import verify as verify_module

    if tamper == "flipped byte":  # fails at the subject digests, after every member was read and written
        gate = bytearray(members["gates/reconstruction.json"])
        gate[len(gate) // 2] ^= 1
        path = rebuild({**members, "gates/reconstruction.json": bytes(gate)}, tmp_path / "t.tar.gz")
    else:  # the signature and digests hold; it fails later, at the decision
        decision = json.loads(members["decision.json"])
        decision["phase_movement_authorized"] = not decision["phase_movement_authorized"]
        path = rebuild({**members, "decision.json": canonical_json(decision).encode()}, tmp_path / "t.tar.gz",
                       keys.load_private(keypair.private_path))
    parent = tmp_path / "parent"
    parent.mkdir()
    work = parent / "work"
    if exists:
        work.mkdir()
    seen: list[tuple[bool, list[str], int]] = []
    real_check = verify_module.check_decision

    def spy(contents):  # the state of the disk while the bundle is being checked
        staging = [p for p in (work if exists else parent).iterdir() if p.name.startswith(".sasgate-verify-")]
        seen.append((work.joinpath("bundle").exists(), [p.name for p in parent.iterdir()],
                     stat.S_IMODE(staging[0].stat().st_mode) if staging else -1))
        return real_check(contents)

    monkeypatch.setattr(verify_module, "check_decision", spy)
    res = CliRunner().invoke(main, ["archive", "verify", str(path), "--key", str(keypair.public_path), "--reproduce",
                                    "--workdir", str(work)])
    assert res.exit_code == 1 and "NOT VERIFIED" in res.output
    assert (list(work.iterdir()) == [] if exists else not work.exists())
    assert [p.name for p in parent.iterdir()] == (["work"] if exists else [])
    if tamper != "flipped byte":
        (bundle_there, names, mode), = seen
        assert not bundle_there and mode == 0o700  # checked inside the private folder only
        assert names == ["work"] if exists else len(names) == 1 and names[0].startswith(".sasgate-verify-")


def _add_claim(members: dict[str, bytes]) -> dict[str, bytes]:
    text = members["CLAIMS.md"].decode()
    extra = "- **mechanism-sas-features**: The selected SAE latents encode refusal.\n"
    return {**members, "CLAIMS.md": text.replace("## We can claim\n\n", "## We can claim\n\n" + extra).encode()}


def test_claims_md_with_an_added_claim_is_refused(members, keypair, tmp_path):
    edited = _add_claim(members)
    assert edited["CLAIMS.md"] != members["CLAIMS.md"]
    res = CliRunner().invoke(main, ["archive", "verify", str(rebuild(edited, tmp_path / "c.tar.gz")),
                                    "--key", str(keypair.public_path)])
    assert res.exit_code == 1 and "NOT VERIFIED: CLAIMS.md: sha256" in res.output
    # a dishonest signer re-signs the edited file: the state machine still disagrees
    resigned = rebuild(edited, tmp_path / "c2.tar.gz", resign_with=keys.load_private(keypair.private_path))
    res = CliRunner().invoke(main, ["archive", "verify", str(resigned), "--key", str(keypair.public_path)])
    assert res.exit_code == 1 and "NOT VERIFIED: CLAIMS.md does not follow from the gate records" in res.output


def test_resigned_decision_or_gate_edits_do_not_follow(members, keypair, tmp_path):
    key = keys.load_private(keypair.private_path)
    decision = json.loads(members["decision.json"])
    decision["phase_movement_authorized"] = not decision["phase_movement_authorized"]
    edited = {**members, "decision.json": (json.dumps(decision, sort_keys=True, indent=2) + "\n").encode()}
    assert reason(rebuild(edited, tmp_path / "d.tar.gz", key), keypair.public_path).startswith(
        "decision.json does not follow from the gate records: phase_movement_authorized")
    gate = json.loads(members["gates/behaviour.json"])
    assert gate["status"] == "pass"

    def with_gate(g: dict) -> dict:
        return {**members, "gates/behaviour.json": (json.dumps(g, sort_keys=True, indent=2,
                                                               ensure_ascii=False) + "\n").encode()}

    gate["status"] = "fail"  # a status its own checks contradict: the record itself is refused
    assert reason(rebuild(with_gate(gate), tmp_path / "g.tar.gz", key), keypair.public_path) == (
        "decision.json: behaviour gate record, status: 'fail', but its checks give 'pass'")
    agreement = gate["details"]["checks"]["scorer_agreement"]  # a consistent record set, but another decision row
    agreement["threshold"], agreement["pass"] = agreement["observed"] + 0.01, False
    assert reason(rebuild(with_gate(gate), tmp_path / "g2.tar.gz", key), keypair.public_path).startswith(
        "decision.json does not follow from the gate records")


# --- export refusals ------------------------------------------------------------------------


@pytest.mark.parametrize("rel, edit, named", [
    ("gates/reconstruction.json", (b"}", b" }"), "gates/reconstruction.json (modified)"),
    ("artifacts/model/config.json", (b"}", b" }"), "artifacts/model (modified)"),
    ("params.yaml", (b"threshold: 0.12", b"threshold: 0.5"), "params.yaml (reconstruction modified)"),  # stale
])
def test_export_refuses_a_stale_or_modified_workspace(built, keypair, tmp_path, rel, edit, named):
    path = built / rel
    original = path.read_bytes()
    assert edit[0] in original
    try:
        path.write_bytes(original.replace(*edit, 1))
        res = CliRunner().invoke(main, ["archive", "export", "--key", str(keypair.private_path), "--out",
                                        str(tmp_path / "b.tar.gz"), "--root", str(built)])
    finally:
        path.write_bytes(original)
    assert res.exit_code == 20, res.output
    assert "does not match dvc.lock" in res.output and named in res.output
    assert not (tmp_path / "b.tar.gz").exists()


def test_export_refuses_private_keys_among_the_files(built, keypair, tmp_path):
    inside = keys.generate(built / "keys")
    try:
        sh(["git", "add", "keys"], built)
        res = CliRunner().invoke(main, ["archive", "export", "--key", str(inside.private_path), "--out",
                                        str(tmp_path / "b.tar.gz"), "--root", str(built)])
        assert res.exit_code == 21 and "is one of the files to bundle" in res.output
        res = CliRunner().invoke(main, ["archive", "export", "--key", str(keypair.private_path), "--out",
                                        str(tmp_path / "b.tar.gz"), "--root", str(built)])
        assert res.exit_code == 21 and "looks like a private key: keys/sasgate_ed25519" in res.output
    finally:
        sh(["git", "rm", "-rq", "--cached", "keys"], built)
        shutil.rmtree(built / "keys")
    assert not (tmp_path / "b.tar.gz").exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_readme_recipe_checks_the_envelope_with_standard_tools(bundle_path, keypair, tmp_path):
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- archive-recipe -->\n```bash\n(.*?)```\n<!-- /archive-recipe -->", readme, re.S)
    assert block, "README lost its archive recipe"
    shutil.copy(bundle_path, tmp_path / "result.tar.gz")
    shutil.copy(keypair.public_path, tmp_path / "signer.pub")
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all digests match" in res.stdout and "Signature Verified Successfully" in res.stdout
    pae = tmp_path / "pae.bin"
    pae.write_bytes(pae.read_bytes() + b" ")  # the openssl step fails on altered bytes
    res = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "signer.pem", "-rawin", "-in",
                          "pae.bin", "-sigfile", "sig.bin"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode != 0


# --- reproduce ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reproduced(bundle_path, keypair, tmp_path_factory):
    work = tmp_path_factory.mktemp("reproduce") / "work"
    res = CliRunner().invoke(main, ["archive", "verify", str(bundle_path), "--key", str(keypair.public_path),
                                    "--reproduce", "--workdir", str(work), "--json"])
    return res, work


def test_reproduce_on_the_same_machine_is_bit_exact(reproduced):
    res, work = reproduced
    assert res.exit_code == 0, res.output + (work / "dvc-repro.log").read_text()
    report = json.loads(res.output)
    assert report["verified"] and report["reproduce"]["verdict"] == "bit-exact", report["reproduce"]
    assert report["reproduce"]["n_artifacts"] > 20 and report["reproduce"]["differing"] == []
    assert report["reproduce"]["code"].startswith("the bundle's source (sasgate, sasgate.archive, sasgate.stages")
    assert (work / "project" / ".git").is_dir() and (work / "project" / "artifacts" / "model").is_dir()


def _perturbed(work: Path, tmp_path: Path, edit) -> Path:
    project = tmp_path / "project"
    shutil.copytree(work / "project", project, ignore=shutil.ignore_patterns(".git", ".dvc"))
    edit(project)
    return project


def _gate_edit(factor: float = 1.0, flip: bool = False):
    def edit(project: Path) -> None:
        p = project / "gates" / "reconstruction.json"
        rec = json.loads(p.read_text())
        for t in rec["per_tuple"]:
            t["observed"] *= factor
        if flip:
            rec["status"] = "pass" if rec["status"] == "fail" else "fail"
        p.write_text(json.dumps(rec, sort_keys=True, indent=2) + "\n")
    return edit


@pytest.mark.parametrize("edit, verdict, named", [
    (lambda p: None, "bit-exact", None),
    (lambda p: (p / "metrics" / "model.json").write_text('{"differs": true}\n'), "decision-equivalent",
     "metrics/model.json"),
    (_gate_edit(1.001), "decision-equivalent", "gates/reconstruction.json"),
    (_gate_edit(1.5), "not reproduced", "gates/reconstruction.json"),
    (_gate_edit(flip=True), "not reproduced", "gates/reconstruction.json"),
])
def test_compare_verdicts_follow_the_rerun_outputs(reproduced, bundle_path, keypair, tmp_path, edit, verdict, named):
    _, work = reproduced
    v = verify(bundle_path, keys.load_public(keypair.public_path))
    project = _perturbed(work, tmp_path, edit)
    outcome = compare(v, work / "bundle", project, read_pipeline(work / "bundle"))
    assert outcome.verdict == verdict, outcome.to_json()
    assert outcome.first_difference == named
    if verdict == "not reproduced":
        assert named in outcome.reason


def _behaviour_flip(project: Path) -> None:
    """The issue's example, with the CI rule: a comparison's CI lower bound -0.099 becomes -0.101 at margin 0.1
    (within tolerance, opposite verdict: holds becomes inconclusive)."""
    p = project / "gates" / "behaviour.json"
    rec = json.loads(p.read_text())
    c = rec["comparisons"][0]
    c["ci"][0] = -0.101 if c["outcome"] == "holds" else -0.099
    c["outcome"] = {"holds": "inconclusive", "inconclusive": "holds", "fails": "inconclusive"}[c["outcome"]]
    rec["outcome"] = c["outcome"] if c["outcome"] != "holds" else rec["outcome"]
    p.write_text(json.dumps(rec, sort_keys=True, indent=2) + "\n")


def test_a_flipped_verdict_is_not_reproduced_even_with_figures_in_tolerance(reproduced, bundle_path, keypair,
                                                                             tmp_path):
    _, work = reproduced
    v = verify(bundle_path, keys.load_public(keypair.public_path))
    project = _perturbed(work, tmp_path, _behaviour_flip)
    outcome = compare(v, work / "bundle", project, read_pipeline(work / "bundle"))
    assert outcome.verdict == "not reproduced" and outcome.first_difference == "gates/behaviour.json"
    assert outcome.reason.startswith("a verdict flipped: gates/behaviour.json ")
    assert any("comparison (induce, addition) outcome" in f for f in outcome.flips)


def test_a_rerun_with_a_changed_margin_whose_outcome_flips_is_not_reproduced(reproduced, bundle_path, keypair,
                                                                             tmp_path):
    """A real `dvc repro` with another validity.margin: every figure stays (the margin moves none of them),
    every gate status and the decision state stay, the outcome flips."""
    _, work = reproduced
    project = shutil.copytree(work / "project", tmp_path / "project", symlinks=True)  # git, DVC cache, outputs
    before = json.loads((project / "gates" / "behaviour.json").read_text())
    from sasgate.behaviour import overall, three_valued

    def outcome_at(m: float) -> str:
        return overall([three_valued(tuple(c["ci"]), m) for c in before["comparisons"]])

    # a margin that flips the outcome while DIM still beats it (so the gate's status, assay sensitivity, stays)
    dim_lo = min(c["effect_ci"]["dim"][0] for c in before["comparisons"])
    margin = next((m / 100 for m in range(100) if m / 100 < dim_lo and outcome_at(m / 100) != before["outcome"]), None)
    assert margin is not None, "no margin in [0, 1) flips this outcome and keeps the gate valid"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validity"]["margin"] = margin
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = _sh([sys.executable, "-m", "dvc", "repro"], project, pythonpath=work / "pythonpath")
    assert res.returncode == 0, res.stdout + res.stderr
    after = json.loads((project / "gates" / "behaviour.json").read_text())
    assert after["outcome"] != before["outcome"] and after["status"] == before["status"]
    assert [c["estimate"] for c in after["comparisons"]] == [c["estimate"] for c in before["comparisons"]]
    v = verify(bundle_path, keys.load_public(keypair.public_path))
    assert _within_tolerance(work / "bundle", project, v.info["tolerances"])[0] is None  # figures: all in tolerance
    old_d, new_d = (json.loads((d / "decision.json").read_text()) for d in (work / "bundle", project))
    assert {k: old_d[k] for k in ("decision_state", "active_path")} == {k: new_d[k] for k in ("decision_state",
                                                                                              "active_path")}
    outcome = compare(v, work / "bundle", project, read_pipeline(work / "bundle"))
    assert outcome.verdict == "not reproduced", outcome.to_json()
    flip = (f"gates/behaviour.json outcome: {before['outcome']!r} in the bundle, {after['outcome']!r} in the re-run")
    assert flip in outcome.flips and outcome.reason.startswith("a verdict flipped: ")


def test_reproduce_reports_a_failed_rerun(reproduced, bundle_path, keypair, tmp_path):
    _, work = reproduced
    v = verify(bundle_path, keys.load_public(keypair.public_path))
    project = _perturbed(work, tmp_path, lambda p: shutil.rmtree(p / "artifacts" / "saes"))
    outcome = compare(v, work / "bundle", project, read_pipeline(work / "bundle"), failure="dvc repro failed: x")
    assert outcome.verdict == "not reproduced" and outcome.first_difference.startswith("artifacts/saes/")


def test_project_members_are_the_workspace_files(members, built):
    for name, data in members.items():
        if not bundle.reserved(name):
            assert (built / name).read_bytes() == data, name
