"""What the watcher knows about one SAE (a descriptor) or why it passed over a file or folder.

Hook names follow transformer-lens: `blocks.{l}.hook_resid_pre` is the input of block l (equal
to `blocks.{l-1}.hook_resid_post`), `blocks.{l}.hook_resid_post` its output. Descriptors are
built from what a release declares (cfg.json, hyperparams.json, the sae-lens registry's ids, a
documented path layout), never guessed; anything else becomes a `Skipped` with the reason.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from sasgate.artifacts import is_pickle_name  # noqa: F401  (re-exported for the enumerators)

_HOOK = re.compile(r"^blocks\.(\d+)\.(?:hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)|attn\.(hook_z))$")
_SHA40 = re.compile(r"^[0-9a-f]{40}$")

Source = Literal["registry", "hub", "local"]


def parse_hook(hook: str) -> tuple[int | None, str | None]:
    """(layer, site) of a transformer-lens hook name; site `attn_z` for `blocks.l.attn.hook_z`
    (per-head outputs before W_O: not attn_out). (None, None) for hooks outside a block."""
    m = _HOOK.match(hook)
    if not m:
        return None, None
    return int(m[1]), (m[2] or "attn_z")


def hook_name(layer: int, site: str) -> str:
    return f"blocks.{layer}.attn.hook_z" if site == "attn_z" else f"blocks.{layer}.hook_{site}"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SaeDescriptor(_Frozen):
    """One SAE: where it is, what it was trained on and at which hook, and what is known of it."""

    source: Source
    layout: str  # sae_lens, gemma_scope, gemma_scope_2, sparsify, llama_scope, or registry
    repo: str | None  # Hub repo id (registry: the release's repo)
    revision: str | None  # commit sha the files were read at (registry, offline: unknown)
    path: str  # folder (or file) in the repo; local: the folder, project-relative
    release: str | None = None  # sae-lens registry release
    sae_id: str | None = None  # sae-lens registry id within the release
    model: str  # the model it was trained on, as declared
    hook_name: str
    hook_source: str  # what declares the hook: "cfg.json", "registry id", "path (Gemma Scope)", ...
    layer: int | None
    site: str | None
    width: int | None = None  # d_sae
    architecture: str | None = None
    l0: float | None = None
    weights: str | None = None  # the weights file, repo-relative (always a safe format)
    scopes: tuple[str, ...] = ()  # which queries found it ("author:google", "registry:gemma-2-2b")

    @property
    def id(self) -> str:
        """Stable across revisions: an SAE whose files change in place is the same SAE."""
        if self.source == "registry":
            return f"registry:{self.release}/{self.sae_id}"
        if self.source == "hub":
            return f"hub:{self.repo}/{self.path}"
        return f"local:{self.path}"

    @property
    def label(self) -> str:
        if self.source == "registry":
            return f"{self.release}/{self.sae_id}"
        return f"{self.repo}/{self.path}" if self.repo else self.path

    @property
    def spec(self) -> str | None:
        """A params `tuples[].sae` string that loads it (sasgate/sae_io.py), or None when none does:
        Hub folders in sae-lens disk format at a known commit, registry SAEs at a known commit,
        local folders."""
        if self.source == "local":
            return f"path:{self.path}"
        if not (self.revision and _SHA40.match(self.revision)):
            return None
        if self.source == "registry":
            return f"sae_lens:{self.release}/{self.sae_id}@{self.revision}"
        return f"hf:{self.repo}/{self.path}@{self.revision}" if self.layout == "sae_lens" else None


class Skipped(_Frozen):
    """A file, folder or release the watcher did not turn into a descriptor, and why."""

    where: str
    reason: str
    model: str | None = None  # the model it was for, when known: reports keep the skips of the models asked about

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"
