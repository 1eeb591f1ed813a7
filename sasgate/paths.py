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

    @property
    def run_log(self) -> Path:
        """Timings and hosts go here, never into a DVC output (DESIGN rule 1)."""
        return self.root / "logs" / "runs.jsonl"
