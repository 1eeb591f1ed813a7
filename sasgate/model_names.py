"""Model identity: when two model names denote one model, and a model's base / instruction-tuned variant.

The one rule, shared by the watcher, the sae-lens registry reader, remediation and the SAE
checks: a name is resolved through transformer-lens's alias table (`OFFICIAL_MODEL_NAMES` with
`MODEL_ALIASES`, as `loading_from_pretrained.get_official_model_name` reads it), so `gpt2-small`
is `gpt2` and `gemma-2-2b` is `google/gemma-2-2b`; a name the table does not know stands as
written. The owner is part of the resolved name: `someorg/gemma-2-2b-it` is not
`google/gemma-2-2b-it`, and an ownerless name the table cannot place is only that ownerless name.
Names compare case-insensitively, as the Hub and the table do.

The family of a model is its resolved name without a variant suffix (`-it`, `-instruct`,
`-chat`: instruction-tuned; `-pt`, `-base` or none: base), resolved again:
`google/gemma-2-2b-it` and `gemma-2-2b` are both of the family `google/gemma-2-2b`.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

Variant = Literal["base", "instruction-tuned"]

_INSTRUCT = re.compile(r"[-_](it|instruct|chat)$", re.IGNORECASE)
_BASE = re.compile(r"[-_](pt|base)$", re.IGNORECASE)


@lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    """Lower-cased alias or official name -> official name, as `make_model_alias_map` builds it
    (tests/test_watch_coverage.py checks they are equal). The table is transformer-lens's data module
    `supported_models`, read by path when transformer-lens is not imported yet: importing the package
    imports torch and transformers (about 13 s of CPU), which a cron poll of the Hub does not need."""
    table = sys.modules.get("transformer_lens.supported_models")
    if table is None:
        spec = importlib.util.find_spec("transformer_lens")  # finds the package without running it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("transformer-lens is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / "supported_models.py"
        loader = importlib.util.spec_from_file_location("_sasgate_tl_supported_models", path)
        if loader is None or loader.loader is None:
            raise ImportError(f"cannot read {path}")
        table = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(table)
    out: dict[str, str] = {}
    for official in table.OFFICIAL_MODEL_NAMES:
        for alias in table.MODEL_ALIASES.get(official, []):
            out[alias.lower()] = official
        out[official.lower()] = official
    return out


def _resolve(name: str) -> str:
    return _aliases().get(name.lower(), name)


@dataclass(frozen=True)
class ModelName:
    """A declared model name and what it resolves to."""

    declared: str
    resolved: str

    @property
    def owner(self) -> str | None:
        return self.resolved.split("/", 1)[0] if "/" in self.resolved else None

    @property
    def variant(self) -> Variant:
        return "instruction-tuned" if _INSTRUCT.search(self.resolved) else "base"

    @property
    def family(self) -> str:
        """The resolved base model, lower-cased: what "trained on the same model" compares."""
        stem = (_INSTRUCT if self.variant == "instruction-tuned" else _BASE).sub("", self.resolved)
        return _resolve(stem).lower()

    def __str__(self) -> str:
        return self.resolved if self.resolved == self.declared else f"{self.declared} (= {self.resolved})"


@lru_cache(maxsize=4096)
def resolve(name: str) -> ModelName:
    return ModelName(name, _resolve(name))


def same_model(a: str, b: str) -> bool:
    """One model: equal resolved names (variant included)."""
    return a.lower() == b.lower() or resolve(a).resolved.lower() == resolve(b).resolved.lower()


def family_relation(a: str, b: str) -> Literal["same", "owner", "other"]:
    """`same` family; `owner`: the same name under another (or no) owner, which never counts; `other`."""
    fa, fb = resolve(a).family, resolve(b).family
    if fa == fb:
        return "same"
    return "owner" if fa.rsplit("/", 1)[-1] == fb.rsplit("/", 1)[-1] else "other"
