"""The overclaim guard: precision and recall on our labelled corpus, suppression rules, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from gate_records import TUPLES, behaviour, reconstruction, remediation, stability
from sasgate.claims import FINDINGS
from sasgate.claims_lint import PATTERNS, lint_text
from sasgate.decision import decide, render_claims_md, write_decision
from sasgate.status import decide_record

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "claims_corpus.jsonl"
STUDY = REPO / "records" / "original-study.yaml"
MIN_SCORE = 0.9


@pytest.fixture(scope="module")
def study_disallowed() -> list[str]:
    return [c.id for c in decide_record(STUDY)[0].claims.disallowed]


def test_corpus_is_ours_labelled_and_large_enough():
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 40
    assert {r["label"] for r in rows} == {"allowed", "overclaim"}
    assert all((r["claim"] in FINDINGS) == (r["label"] == "overclaim") for r in rows)
    assert sum(r["label"] == "overclaim" for r in rows) >= 20 and sum(r["label"] == "allowed" for r in rows) >= 20
    texts = [r["text"] for r in rows]
    assert len(texts) == len(set(texts))


def test_precision_and_recall_on_the_corpus(study_disallowed, capsys):
    """Against the original study's decision (mechanism, causal, phase, reconstruction and unconstrained
    robustness claims withheld). Splits: `first` was written before the linter; each `heldoutN` batch was
    written before the linter was run on it (README gives the figures each batch had when first measured)."""
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0})
    for r in rows:
        flagged = bool(lint_text(r["text"], study_disallowed))
        gold = r["label"] == "overclaim"
        key = ("t" if flagged == gold else "f") + ("p" if flagged else "n")
        for split in (r["split"], "all"):
            counts[split][key] += 1
    with capsys.disabled():
        for split, c in counts.items():
            p = c["tp"] / max(1, c["tp"] + c["fp"])
            r_ = c["tp"] / max(1, c["tp"] + c["fn"])
            print(f"\nclaims lint on {split}: precision {p:.3f} recall {r_:.3f} ({c})", end="")
        print()
    c = counts["all"]
    precision, recall = c["tp"] / (c["tp"] + c["fp"]), c["tp"] / (c["tp"] + c["fn"])
    assert precision >= MIN_SCORE and recall >= MIN_SCORE, (precision, recall)


def test_every_finding_has_patterns():
    assert set(PATTERNS) == set(FINDINGS)
    assert all(PATTERNS[c] for c in FINDINGS)


MECH = ["mechanism-sas-features", "causal-sas-features"]


@pytest.mark.parametrize("text", [
    "We cannot claim that feature 12 encodes refusal.",
    "The phrase \"feature 12 encodes refusal\" is an example of what not to write.",
    "Is feature 12 a refusal feature?",
    "```\nfeature 12 encodes refusal\n```",
    "<!-- feature 12 encodes refusal -->",
    "## We cannot claim\n\n- Feature 12 encodes refusal.\n",
    "Whether feature 12 encodes refusal is left open.",
    "That feature 12 encodes refusal is not established.",
])
def test_negated_quoted_hedged_and_code_text_is_not_flagged(text):
    assert lint_text(text, MECH) == []


@pytest.mark.parametrize("text", [
    "Feature 12 encodes refusal.",
    "Nobody can deny that feature 12 encodes refusal.",
    "This is not just steering: feature 12 encodes refusal.",
    "## We can claim\n\n- Feature 12 encodes refusal.\n",
])
def test_affirmative_overclaims_are_flagged(text):
    assert [f.claim for f in lint_text(text, MECH)] == ["mechanism-sas-features"]


def test_findings_name_file_line_and_claim():
    text = "# Results\n\nSAS matched DIM.\nWe also think that\nlatent 7 causes refusal. Fine.\n"
    (f,) = lint_text(text, ["causal-sas-features"], "paper.md")
    assert (f.file, f.line, f.claim, f.match) == ("paper.md", 5, "causal-sas-features", "causes refusal")
    assert str(f).startswith("paper.md:5: overclaim [causal-sas-features]")


def test_only_disallowed_claims_are_checked():
    text = "Feature 12 encodes refusal. SAS matches DIM within the margin."
    assert [f.claim for f in lint_text(text, MECH + ["sas-matches-dim"])] == [
        "mechanism-sas-features", "sas-matches-dim"]
    passed = decide({"behaviour": behaviour(), "stability": stability(), "reconstruction": reconstruction(0.05, 0.05),
                     "remediation": remediation("not_needed")}, TUPLES)
    assert lint_text(text, [c.id for c in passed.claims.disallowed]) == []


def test_generated_claims_md_passes_its_own_lint(study_disallowed):
    assert lint_text(render_claims_md(decide_record(STUDY)[0]), study_disallowed) == []


def sasgate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sasgate.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_exit_codes_and_output(tmp_path):
    (tmp_path / "post.md").write_text("Intro.\n\nFeature 12 encodes refusal.\n", encoding="utf-8")
    (tmp_path / "clean.md").write_text("SAS matched DIM within the margin. We make no mechanistic claim.\n")
    res = sasgate("claims", "lint", "post.md", "clean.md", "--record", str(STUDY), cwd=tmp_path)
    assert res.returncode == 1
    assert res.stdout.startswith("post.md:3: overclaim [mechanism-sas-features]")
    assert sasgate("claims", "lint", "clean.md", "--record", str(STUDY), cwd=tmp_path).returncode == 0
    res = sasgate("claims", "lint", "post.md", "--record", str(STUDY), "--json", cwd=tmp_path)
    out = json.loads(res.stdout)
    assert res.returncode == 1 and [(f["line"], f["claim"]) for f in out["findings"]] == [
        (3, "mechanism-sas-features")]
    # the pipeline's decision.json by default; --decision for another
    res = sasgate("claims", "lint", "post.md", cwd=tmp_path)
    assert res.returncode == 5 and "decision.json" in res.stderr
    write_decision(tmp_path / "decision.json", decide_record(STUDY)[0])
    assert sasgate("claims", "lint", "post.md", cwd=tmp_path).returncode == 1
    assert sasgate("claims", "lint", "post.md", "--decision", "decision.json", cwd=tmp_path).returncode == 1
    res = sasgate("claims", "lint", "post.md", "--decision", "decision.json", "--record", str(STUDY), cwd=tmp_path)
    assert res.returncode == 2 and "not both" in res.stderr
    assert sasgate("claims", "lint", "missing.md", "--record", str(STUDY), cwd=tmp_path).returncode == 5
