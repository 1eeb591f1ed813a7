"""Benchmark (not a test): `sasgate archive verify` throughput against `sha256sum` on the same files.

Builds a throwaway small project (tests/projects.py SMALL, real git + `dvc repro`; or copies
an already built project given with --project), adds a DVC stage that generates GIB gibibytes of float32 "activations" as a DVC-cached out, exports
with --include-large, then alternates, REPEATS times, a full verify of the bundle (gzip
stream, safety checks, sha256 of every member, signature, decision re-derivation) with
`sha256sum` over the same files extracted by `tar -xzf`. Prints both throughputs and their
ratio (median of the runs; > 1 means verify is faster than sha256sum), and for context the
same files hashed with Python's hashlib (OpenSSL; uses the CPU's SHA extensions where
coreutils' sha256sum may not).

    python benchmarks/bench_verify.py [--gib 1] [--repeats 3] [--workdir DIR] [--project BUILT]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from projects import SMALL, dvc, make_project, sh  # noqa: E402

from sasgate.archive import keys  # noqa: E402
from sasgate.artifacts import sha256_file  # noqa: E402
from sasgate.archive.export import export  # noqa: E402
from sasgate.archive.verify import verify  # noqa: E402

BLOB_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    n, mib = int(sys.argv[1]), int(sys.argv[2])
    out = Path("artifacts/bench_blob")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # deterministic float32 "activations": incompressible like real ones
        rng = np.random.default_rng(i)
        (out / f"acts-{i:03d}.bin").write_bytes(rng.standard_normal(mib << 18, dtype=np.float32).tobytes())
""")


def build(work: Path, gib: float, project: Path | None) -> tuple[Path, Path, Path]:
    """(project, bundle, public key) with about `gib` GiB of generated artifacts included."""
    if project is None:
        root = make_project(work / "proj", SMALL)
    else:
        root = work / "proj"
        shutil.copytree(project, root, symlinks=True)
    mib = 128
    n_files = max(1, round(gib * 1024 / mib))
    (root / "bench_blob.py").write_text(BLOB_SCRIPT)
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"]["bench_blob"] = {"cmd": f"python bench_blob.py {n_files} {mib}", "deps": ["bench_blob.py"],
                                    "outs": ["artifacts/bench_blob"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "bench stage"], root)
    t = time.perf_counter()
    dvc(root, "repro")
    print(f"dvc repro (small pipeline + {n_files} x {mib} MiB): {time.perf_counter() - t:.1f} s")
    kp = keys.generate(work / "keys")
    t = time.perf_counter()
    res = export(root, kp.private_path, work / "bundle.tar.gz", include_large=True)
    dt = time.perf_counter() - t
    print(f"export --include-large: {dt:.1f} s, bundle {res.out.stat().st_size / 2**30:.2f} GiB")
    return root, res.out, kp.public_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="generated artifact size in GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temp folder, removed)")
    ap.add_argument("--project", type=Path, help="copy this built project (after `dvc repro`) instead of building one")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sasgate-bench-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _, bundle, pub = build(work, args.gib, args.project)
        extracted = work / "extracted"
        extracted.mkdir()
        subprocess.run(["tar", "-xzf", str(bundle), "-C", str(extracted)], check=True)
        files = sorted(str(p) for p in extracted.rglob("*") if p.is_file())
        total = sum(Path(f).stat().st_size for f in files)
        key = keys.load_public(pub)
        t_verify, t_sha, t_hashlib = [], [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            verify(bundle, key)
            t_verify.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL)
            t_sha.append(time.perf_counter() - t)
            t = time.perf_counter()
            for f in files:
                sha256_file(f)
            t_hashlib.append(time.perf_counter() - t)
        v, s, h = statistics.median(t_verify), statistics.median(t_sha), statistics.median(t_hashlib)
        mib = total / 2**20
        print(f"files: {len(files)}, {total / 2**30:.3f} GiB (bundle {bundle.stat().st_size / 2**30:.3f} GiB)")
        print(f"verify:    {v:.2f} s  {mib / v:.0f} MiB/s   runs {[round(x, 2) for x in t_verify]}")
        print(f"sha256sum: {s:.2f} s  {mib / s:.0f} MiB/s   runs {[round(x, 2) for x in t_sha]}")
        print(f"hashlib:   {h:.2f} s  {mib / h:.0f} MiB/s   runs {[round(x, 2) for x in t_hashlib]}")
        print(f"ratio verify/sha256sum throughput: {s / v:.2f}  (verify/hashlib: {h / v:.2f})")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
