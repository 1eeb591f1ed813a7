"""Where every artifact lives, relative to the project root (the folder holding dvc.yaml).

dvc.yaml names the same paths; tests/test_dvc_yaml.py checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> "Paths":
        return cls(Path(root).resolve())

    def rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()

    # inputs kept in git
    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def scorer_versions(self) -> Path:
        """The scorer version files `score` runs: the project's own, which dvc.yaml tracks as a dep."""
        return self.root / "sasgate" / "scorer_versions"

    @property
    def eval_lock(self) -> Path:
        return self.data / "eval.lock"

    # DVC outputs
    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def model_dir(self) -> Path:
        return self.artifacts / "model"

    @property
    def collect_dir(self) -> Path:
        return self.artifacts / "collect"

    @property
    def saes_dir(self) -> Path:
        return self.artifacts / "saes"

    def sae_dir(self, tuple_key: str) -> Path:
        return self.saes_dir / tuple_key

    # behaviour half (issue 3): DIM, SAS, steering, scores
    @property
    def directions_dir(self) -> Path:
        return self.artifacts / "directions"

    @property
    def features_dir(self) -> Path:
        return self.artifacts / "features"

    @property
    def calibrate_dir(self) -> Path:
        return self.artifacts / "calibrate"

    @property
    def steer_dir(self) -> Path:
        return self.artifacts / "steer"

    @property
    def score_dir(self) -> Path:
        return self.artifacts / "score"

    @property
    def gates(self) -> Path:
        return self.root / "gates"

    def gate(self, name: str) -> Path:
        return self.gates / f"{name}.json"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.json"

    def manifest(self, stage: str) -> Path:
        return self.root / "manifests" / f"{stage}.json"

    # preregistration, decision and claims (issue 5): the lock and rules are in git; decision.json
    # and CLAIMS.md are DVC outs (cache: false) at the project root
    @property
    def stop_rules(self) -> Path:
        return self.root / "preregistration" / "stop_rules.yaml"

    @property
    def preregistration_lock(self) -> Path:
        return self.root / "preregistration" / "lock.json"

    @property
    def decision(self) -> Path:
        return self.root / "decision.json"

    @property
    def claims_md(self) -> Path:
        return self.root / "CLAIMS.md"

    @property
    def report(self) -> Path:
        """report.html (issue 17): the self-contained page of every record and plot, a DVC out at the root."""
        return self.root / "report.html"

    @property
    def run_log(self) -> Path:
        """Timings and hosts go here, never into a DVC output (DESIGN rule 1)."""
        return self.root / "logs" / "runs.jsonl"
