"""The installed sae-lens registry (pretrained_saes.yaml, read by sae-lens's own loader) as descriptors.

Offline: nothing is downloaded, so the revision of a registry SAE is unknown (None) and its
architecture too, unless the release's documented layout names it. The hook comes from the
SAE id when the id is a transformer-lens hook name (`blocks.8.hook_resid_pre`, also with a
suffix such as `__trainer_0`), otherwise from the release's documented path layout
(`sasgate.watch.layouts`); anything else is skipped with the reason.
"""

from __future__ import annotations

import re
from typing import Any

from .descriptors import SaeDescriptor, Skipped, hook_name, is_pickle_name
from .layouts import Named, dictionary_learning, gemma_scope, gemma_scope_2, llama_scope

_ID_HOOK = re.compile(r"^blocks\.(\d+)\.(?:hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)|(?:attn\.)?hook_z)(?=$|_)")
_GEMMA_SCOPE_RELEASE = re.compile(r"^gemma-scope-\d+b-(?:pt|it)-(res|mlp|att)(?:-canonical)?$")


def _transcoders(release: str, lookup: Any) -> bool:
    return "transcoder" in release or "transcoder" in str(lookup.conversion_func or "") or "clt" in release


def _named(release: str, sae_id: str, path: str) -> Named | None:
    if m := _ID_HOOK.match(sae_id):
        return Named(int(m[1]), m[2] or "attn_z", "registry id")
    if m := _GEMMA_SCOPE_RELEASE.match(release):
        return gemma_scope(sae_id, m[1])
    return gemma_scope_2(path) or llama_scope(path) or dictionary_learning(path)


def _architecture(lookup: Any) -> str | None:
    return "jumprelu" if lookup.conversion_func in ("gemma_2", "gemma_3") else None


def read_registry() -> tuple[list[SaeDescriptor], list[Skipped], str]:
    """Every SAE of the installed registry that names its hook; the rest as skipped; the sae-lens version."""
    import sae_lens
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    found: list[SaeDescriptor] = []
    skipped: list[Skipped] = []
    for release, lookup in sorted(get_pretrained_saes_directory().items()):
        where = f"registry:{release}"
        if _transcoders(release, lookup):
            skipped.append(Skipped(where=where, reason="transcoders (MLP input to output), not an SAE of one site",
                                   model=lookup.model))
            continue
        for sae_id, path in sorted(lookup.saes_map.items()):
            if is_pickle_name(path):
                skipped.append(Skipped(where=f"{where}/{sae_id}", reason=f"stored as a pickle ({path}); sasgate "
                                       "refuses pickles", model=lookup.model))
                continue
            named = _named(release, sae_id, path)
            if named is None:
                skipped.append(Skipped(where=f"{where}/{sae_id}", reason="neither the id nor the release's path "
                                       f"layout ({path}) names a hook sasgate reads", model=lookup.model))
                continue
            l0 = lookup.expected_l0.get(sae_id) or named.l0  # the registry writes 0.0 for "not given"
            found.append(SaeDescriptor(
                source="registry", layout="registry", repo=lookup.repo_id, revision=None, path=path,
                release=release, sae_id=sae_id, model=lookup.model, hook_name=hook_name(named.layer, named.site),
                hook_source=named.convention, layer=named.layer, site=named.site, width=named.width,
                architecture=_architecture(lookup), l0=l0 or None, scopes=(f"registry:{release}",)))
    return found, skipped, sae_lens.__version__

