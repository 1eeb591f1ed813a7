"""What a documented folder or id layout says about an SAE: (layer, site, width, L0) from names alone.

These are the layouts whose names carry the hook by convention (Gemma Scope, Gemma Scope 2,
Llama Scope, dictionary_learning); the registry reader and the Hub reader share them so the two
never read one convention two ways. Layouts that declare their hook in a file (sae-lens
cfg.json, sparsify cfg.json, Llama Scope hyperparams.json) are read in `sasgate.watch.hub`.
A name that does not fit returns None: the caller reports it as skipped, never guesses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Gemma Scope: layer_5/width_16k/average_l0_105 (the registry's canonical ids end in /canonical)
_GEMMA_SCOPE = re.compile(r"^layer_(\d+)/width_(\w+?)/(?:average_l0_(\d+)|canonical)$")
# Gemma Scope 2: resid_post/layer_17_width_16k_l0_big (also resid_post_all/, mlp_out/, attn_out/)
_GEMMA_SCOPE_2 = re.compile(r"^(resid_post|mlp_out|attn_out)(?:_all)?/layer_(\d+)_width_(\w+?)_l0_(\w+?)$")
# Llama Scope: Llama3_1-8B-Base-L15R-8x (R residual stream out, A attention out, M MLP out)
_LLAMA_SCOPE = re.compile(r"(?:^|/)[\w.-]*-L(\d+)([RAM])-(\d+)x$")
# dictionary_learning (SAEBench, andyrdt): .../resid_post_layer_3/trainer_1
_DICT_LEARNING = re.compile(r"(?:^|/)(resid_post|resid_pre|mlp_out|attn_out)_layer_(\d+)/trainer_\d+$")
# Gemma Scope repo suffixes: the site is in the repo (release) name, not the path
GEMMA_SCOPE_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
_GEMMA_SCOPE_2_SITES = {"resid_post": "resid_post", "mlp_out": "mlp_out", "attn_out": "attn_z"}
_LLAMA_SCOPE_SITES = {"R": "resid_post", "A": "attn_out", "M": "mlp_out"}
# Hub repos: google/gemma-scope-2b-pt-res -> gemma-2-2b; google/gemma-scope-2-4b-it -> google/gemma-3-4b-it
_GEMMA_SCOPE_REPO = re.compile(r"^google/gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)$")
_GEMMA_SCOPE_2_REPO = re.compile(r"^google/gemma-scope-2-(\d+[bm])-(pt|it)(?:-[\w-]+)?$")


@dataclass(frozen=True)
class Named:
    """What a name declares, and which convention said so (kept as the descriptor's hook_source)."""

    layer: int
    site: str
    convention: str
    width: int | None = None
    l0: float | None = None


# Gemma Scope and Gemma Scope 2 label a width by its power of two in thousands (millions for
# `m`), rounded down: 65k is 2^16 = 65536, not 65 x 1024. These are the widths they publish
# (embedding SAEs 2^12, the rest 2^14 to 2^20); any other label is an unknown width (None).
GEMMA_SCOPE_WIDTHS = {"4k": 1 << 12, "16k": 1 << 14, "32k": 1 << 15, "65k": 1 << 16, "131k": 1 << 17,
                      "262k": 1 << 18, "524k": 1 << 19, "1m": 1 << 20}


def gemma_scope_width(label: str) -> int | None:
    """d_sae of a Gemma Scope (or Gemma Scope 2) `width_<label>`: '16k' -> 16384, '65k' -> 65536."""
    return GEMMA_SCOPE_WIDTHS.get(label.lower())


def _number(text: str | None) -> float | None:
    return float(text) if text and text.isdigit() else None


def gemma_scope(path: str, site_suffix: str) -> Named | None:
    """`layer_N/width_W/average_l0_K` in a Gemma Scope release whose name ends in res/mlp/att."""
    m = _GEMMA_SCOPE.match(path)
    site = GEMMA_SCOPE_SITES.get(site_suffix)
    if not m or site is None:
        return None
    return Named(int(m[1]), site, f"path (Gemma Scope, {site_suffix} release)", gemma_scope_width(m[2]),
                 _number(m[3]))


def gemma_scope_2(path: str) -> Named | None:
    """`resid_post/layer_L_width_W_l0_X` (Gemma Scope 2); transcoder folders do not match."""
    m = _GEMMA_SCOPE_2.match(path)
    if not m:
        return None
    return Named(int(m[2]), _GEMMA_SCOPE_2_SITES[m[1]], "path (Gemma Scope 2)", gemma_scope_width(m[3]),
                 _number(m[4]))


def llama_scope(path: str) -> Named | None:
    """`...-L{N}R-8x` (Llama Scope): R/A/M = residual stream / attention / MLP output of layer N."""
    m = _LLAMA_SCOPE.search(path)
    if not m:
        return None
    return Named(int(m[1]), _LLAMA_SCOPE_SITES[m[2]], "path (Llama Scope)")


def dictionary_learning(path: str) -> Named | None:
    """`.../resid_post_layer_N/trainer_K` (dictionary_learning, SAEBench)."""
    m = _DICT_LEARNING.search(path)
    if not m:
        return None
    return Named(int(m[2]), m[1], "path (dictionary_learning)")


def gemma_scope_repo_model(repo: str) -> tuple[str, str] | None:
    """(model, site suffix) a Gemma Scope repo name declares: google/gemma-scope-2b-pt-res -> (gemma-2-2b, res)."""
    m = _GEMMA_SCOPE_REPO.match(repo)
    if not m:
        return None
    return f"gemma-2-{m[1]}" + ("-it" if m[2] == "it" else ""), m[3]


def gemma_scope_2_repo_model(repo: str) -> str | None:
    """The model a Gemma Scope 2 repo name declares: google/gemma-scope-2-4b-pt -> google/gemma-3-4b-pt."""
    m = _GEMMA_SCOPE_2_REPO.match(repo)
    return f"google/gemma-3-{m[1]}-{m[2]}" if m else None
