"""Hashing: the manifest's sha256 (`write_manifest`, as every stage writes it) against coreutils'
`sha256sum` on the same files, page cache warm for both. Target: sha256sum time / manifest time >= 0.9.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from .common import Result, best, runs, side_by_side

FILE_MIB = 64


def make_files(folder: Path, total_mib: int) -> list[Path]:
    """Deterministic float32 noise (incompressible, like activations), FILE_MIB MiB per file."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(max(1, total_mib // FILE_MIB)):
        f = folder / f"acts-{i:03d}.bin"
        if not f.is_file() or f.stat().st_size != FILE_MIB << 20:
            data = np.random.default_rng(i).standard_normal(FILE_MIB << 18, dtype=np.float32)
            f.write_bytes(data.tobytes())
        files.append(f)
    return files


def manifest_vs_sha256sum(work: Path, repeats: int, total_mib: int) -> Result:
    from sasgate.artifacts import write_manifest

    if shutil.which("sha256sum") is None:
        raise RuntimeError("sha256sum (coreutils) is not on PATH")
    folder = work / "hash" / "artifacts"
    files = make_files(folder, total_mib)
    manifest = work / "hash" / "manifest.json"

    def manifest_sha() -> None:
        write_manifest(manifest, "bench", [folder], folder.parent)

    def sha256sum() -> None:
        subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)

    t = side_by_side({"manifest": manifest_sha, "sha256sum": sha256sum}, repeats)
    ratio = best(t["sha256sum"]) / best(t["manifest"])
    mib = sum(f.stat().st_size for f in files) / 2**20
    return Result("manifest sha256 / sha256sum", ratio, ">= 0.9", ratio >= 0.9,
                  f"{len(files)} files, {mib:.0f} MiB; manifest {mib / best(t['manifest']):.0f} MiB/s "
                  f"{runs(t['manifest'])} s, sha256sum {mib / best(t['sha256sum']):.0f} MiB/s {runs(t['sha256sum'])} s")
