"""Local SAE folders (a remediation family with `source: local`): sae-lens disk format, read from cfg.json."""

from __future__ import annotations

import json
from pathlib import Path

from .configs import sae_lens_cfg
from .descriptors import SaeDescriptor, Skipped, is_pickle_name

SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"


def read_local(root: Path, folder: str) -> tuple[list[SaeDescriptor], list[Skipped]]:
    """One descriptor per sub-folder of `folder` (project-relative) holding cfg.json + sae_weights.safetensors."""
    found: list[SaeDescriptor] = []
    skipped: list[Skipped] = []
    base = root / folder
    if not base.is_dir():
        return [], [Skipped(where=f"local:{folder}", reason="folder does not exist")]
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        rel = (Path(folder) / d.name).as_posix()
        names = sorted(p.name for p in d.iterdir() if p.is_file())
        if SAE_WEIGHTS not in names:
            pickles = [n for n in names if is_pickle_name(n)]
            why = f"weights only as pickle ({', '.join(pickles)})" if pickles else f"no {SAE_WEIGHTS}"
            skipped.append(Skipped(where=f"local:{rel}", reason=why))
            continue
        try:
            dec = sae_lens_cfg(json.loads((d / SAE_CFG).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            skipped.append(Skipped(where=f"local:{rel}", reason=f"{SAE_CFG}: {exc}"))
            continue
        found.append(SaeDescriptor(source="local", layout="sae_lens", repo=None, revision=None, path=rel,
                                   model=dec.model or "", hook_name=dec.hook_name, hook_source=SAE_CFG,
                                   layer=dec.layer, site=dec.site, width=dec.width, architecture=dec.architecture,
                                   l0=dec.l0, weights=f"{rel}/{SAE_WEIGHTS}", scopes=(f"local:{folder}",)))
    return found, skipped
