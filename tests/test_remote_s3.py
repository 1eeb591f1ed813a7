"""Sharing by DVC remote: push the reproduced pipeline to an S3-compatible store (moto's server on
127.0.0.1), clone the repository fresh, pull, and find every artifact intact with the same hashes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from projects import copy_project, dvc, sh

from sasgate.artifacts import sha256_file

BUCKET = "sasgate-remote-test"
TRACKED = ("artifacts", "gates", "manifests", "metrics", "plots")


@pytest.fixture
def s3(monkeypatch):
    """A local S3 server; AWS credentials and region for every subprocess (dvc reads the env)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def _hashes(root) -> dict[str, str]:
    """sha256 of every file under the pipeline's output folders, by project-relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for d in TRACKED for p in sorted((root / d).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_push_clone_pull_gives_identical_artifacts(reproduced_small, tmp_path, s3):
    src = copy_project(reproduced_small, tmp_path / "origin")
    # the pipeline's record (dvc.lock, cache: false outs) goes to git; the cached outs to the remote
    dvc(src, "remote", "add", "-d", "store", f"s3://{BUCKET}/dvc-cache")
    dvc(src, "remote", "modify", "store", "endpointurl", s3)
    sh(["git", "add", "-A"], src)
    sh(["git", "commit", "-q", "-m", "reproduced, with an S3 remote"], src)
    pushed = dvc(src, "push")
    assert "pushed" in pushed.stdout, pushed.stdout

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(src), str(clone)], tmp_path)
    assert not (clone / "artifacts" / "collect").exists()  # cached outs are not in git
    dvc(clone, "pull")
    status = dvc(clone, "status")
    assert "up to date" in status.stdout, status.stdout
    original, pulled = _hashes(src), _hashes(clone)
    assert any(k.startswith("artifacts/collect/") for k in pulled)
    assert pulled == original
    report = subprocess.run([sys.executable, "-m", "sasgate.cli", "status", "--json"], cwd=clone,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stdout + report.stderr
    assert json.loads(report.stdout)["problems"] == []
