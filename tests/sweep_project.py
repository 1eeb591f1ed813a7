"""A two-stage DVC project that runs in seconds, with its git and DVC remotes, for sweep tests.

Its params.yaml is the repository's (a sweep validates every point against the sasgate schema);
`first` reads eval.seed, `second` reads first.txt and features.top_k, so sweeping features.top_k
reruns `second` alone and pulls `first`'s output from the DVC remote. `second` fails for the top_k that
$SWEEP_TEST_BREAK names (`top_k=6`): a point's stage failing on a node, until the cause is gone.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from projects import REPO, dvc, sh

DVC_YAML = textwrap.dedent("""\
    stages:
      first:
        cmd: python step.py first
        deps: [step.py]
        params: [eval.seed]
        outs: [first.txt]
      second:
        cmd: python step.py second
        deps: [step.py, first.txt]
        params: [features.top_k]
        outs: [second.txt]
        metrics: [{metrics.json: {cache: false}}]
    """)
STEP = textwrap.dedent("""\
    import json, os, sys
    import yaml
    p = yaml.safe_load(open("params.yaml"))
    if os.environ.get("SWEEP_TEST_BREAK") == f"top_k={p['features']['top_k']}" and sys.argv[1] == "second":
        sys.exit(f"second: broken on purpose for top_k={p['features']['top_k']}")
    if sys.argv[1] == "first":
        open("first.txt", "w").write(f"seed {p['eval']['seed']}\\n")
    else:
        open("second.txt", "w").write(open("first.txt").read() + f"top_k {p['features']['top_k']}\\n")
        json.dump({"top_k_squared": p["features"]["top_k"] ** 2}, open("metrics.json", "w"))
    """)


def make(tmp: Path) -> tuple[Path, Path, Path]:
    """(project, bare git remote, DVC folder remote): reproduced, committed, pushed to both."""
    root, git_remote, store = tmp / "project", tmp / "remote.git", tmp / "dvc-store"
    root.mkdir()
    shutil.copyfile(REPO / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    (root / "step.py").write_text(STEP, encoding="utf-8")
    (root / ".gitignore").write_text("/sweeps/\n", encoding="utf-8")
    sh(["git", "init", "-q", "-b", "main"], root)
    dvc(root, "init", "-q")
    dvc(root, "remote", "add", "-d", "store", str(store))
    dvc(root, "repro")
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "baseline"], root)
    dvc(root, "push")
    sh(["git", "init", "-q", "--bare", str(git_remote)], tmp)
    sh(["git", "remote", "add", "origin", str(git_remote)], root)
    sh(["git", "push", "-q", "origin", "main"], root)
    return root, git_remote, store
