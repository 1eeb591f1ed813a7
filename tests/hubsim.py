"""A small imitation of the Hugging Face Hub API on 127.0.0.1, driven by scenario files.

It serves the subset `huggingface_hub` calls for the watcher: the model listing with
`Link: rel="next"` pagination and `expand`, model info, the recursive file tree, and file
downloads (`HEAD` + `GET /{repo}/resolve/{rev}/{path}` with `X-Repo-Commit` and `ETag`).
Tests point the real client at it with `HF_ENDPOINT`. It counts requests per kind (list, info,
tree, head, file) so a test can check what a poll asked for.

A scenario (tests/hub_scenarios/*.json):
  {"page_size": 2,                         # listing page size (default 1000)
   "repos": [{"id": "org/name", "sha": "<40 hex>", "lastModified": "2026-01-01T00:00:00.000Z",
              "tags": [...], "library_name": "...",
              "access": "gated" | "private" | "disabled" | "gone",  # default: public
              "authorized": ["hf_token", ...],   # tokens that may read a gated or private repo
              "files": {"path": {"json": {...}} | {"text": "..."} | {"bytes": 1234} | {"file": "/local/file"}}}],
   "faults": [{"kind": "list" | "tree" | "head" | "file" | "any", "page": 2, "repo": "org/name",
               "status": 500, "retry_after": 1, "truncate": true, "stall": "no_answer" | "mid_body",
               "times": 1}]}
Access as on the Hub: a gated repo lists its tree but answers file requests with 403
`X-Error-Code: GatedRepo` unless the request's `Authorization: Bearer <token>` is authorized; a
private one answers everything with 401 `X-Error-Code: RepoNotFound`; a disabled one with 403
`X-Error-Message: Access to this resource is disabled.`; a gone one (listed, then deleted) with
404 `RepoNotFound`. `times` (default: always) bounds how often a fault fires; `truncate` cuts
the JSON body in half; `stall` accepts the request and never answers (`no_answer`) or sends the
headers and half the body (`mid_body`), then holds the connection open until the server stops.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

SCENARIOS = Path(__file__).parent / "hub_scenarios"


def load_scenario(name: str | Path) -> dict[str, Any]:
    """A scenario; `"include": ["other"]` starts from another scenario's repos (same id: this one wins)."""
    path = Path(name) if Path(name).suffix else SCENARIOS / f"{name}.json"
    sc = json.loads(path.read_text(encoding="utf-8"))
    repos: dict[str, Any] = {}
    for other in sc.pop("include", []):
        repos |= {r["id"]: r for r in load_scenario(other)["repos"]}
    repos |= {r["id"]: r for r in sc.get("repos", [])}
    return {**sc, "repos": list(repos.values())}


def file_bytes(spec: dict[str, Any]) -> bytes:
    if "json" in spec:
        return json.dumps(spec["json"], sort_keys=True).encode()
    if "text" in spec:
        return spec["text"].encode()
    if "file" in spec:
        return Path(spec["file"]).read_bytes()
    return b"\0" * int(spec.get("bytes", 16))


class HubSim:
    """The server; `scenario` can be swapped between polls (the Hub changed), `counts` read and reset."""

    def __init__(self, scenario: dict[str, Any] | str):
        self.lock = threading.Lock()
        self.released = threading.Event()  # set on exit: stalled answers end
        self.counts: Counter[str] = Counter()
        self.by_repo: Counter[tuple[str, str]] = Counter()  # (kind, repo) for tree, head and file requests
        self.set_scenario(scenario)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def set_scenario(self, scenario: dict[str, Any] | str) -> None:
        sc = load_scenario(scenario) if isinstance(scenario, str) else scenario
        with self.lock:
            self.scenario = sc
            self.repos = {r["id"]: r for r in sc.get("repos", [])}
            self.faults = [dict(f) for f in sc.get("faults", [])]
            self.counts.clear()
            self.by_repo.clear()

    def __enter__(self) -> "HubSim":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def fault(self, kind: str, *, page: int | None = None, repo: str | None = None) -> dict[str, Any] | None:
        with self.lock:
            for f in self.faults:
                if f["kind"] not in (kind, "any") or f.get("times", 1) == 0:
                    continue
                if ("page" in f and f["page"] != page) or ("repo" in f and f["repo"] != repo):
                    continue
                if "times" in f:
                    f["times"] -= 1
                return f
        return None


def _listing(sim: HubSim, q: dict[str, list[str]]) -> list[dict[str, Any]]:
    repos = list(sim.repos.values())
    if "author" in q:
        repos = [r for r in repos if r["id"].split("/")[0] == q["author"][0]]
    for tag in q.get("filter", []):
        repos = [r for r in repos if tag in r.get("tags", [])]
    if "search" in q:
        repos = [r for r in repos if q["search"][0].lower() in r["id"].lower()]
    repos.sort(key=lambda r: (r.get("lastModified", ""), r["id"]), reverse=True)
    expand = set(q.get("expand", []))
    out = []
    for r in repos:
        item = {"_id": hashlib.md5(r["id"].encode()).hexdigest()[:24], "id": r["id"], "modelId": r["id"]}
        for key in ("sha", "lastModified", "tags", "library_name"):
            if key in expand and key in r:
                item[key] = r[key]
        out.append(item)
    return out


def _tree(repo: dict[str, Any], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    files = sorted(p for p in repo.get("files", {}) if not prefix or p.startswith(prefix + "/"))
    dirs: set[str] = set()
    for p in files:
        parts = p.split("/")[:-1]
        dirs |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
    entries = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
               for d in sorted(dirs) if not prefix or d.startswith(prefix + "/")]
    entries += [{"type": "file", "oid": hashlib.sha1(p.encode()).hexdigest(),
                 "size": len(file_bytes(repo["files"][p])), "path": p} for p in files]
    if not recursive:
        depth = prefix.count("/") + 1 if prefix else 0
        entries = [e for e in entries if e["path"].count("/") == depth]
    return sorted(entries, key=lambda e: e["path"])


def _handler(sim: HubSim) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  head: bool = False, stall: dict[str, Any] | None = None) -> None:
            if self._stall(stall, "no_answer"):
                return
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            if stall and stall.get("stall") == "mid_body":
                self.wfile.write(body[: len(body) // 2])
                self._stall(stall, "mid_body")
                return
            self.wfile.write(body)

        def _refused(self, repo: dict[str, Any], head: bool = False, files: bool = False) -> bool:
            """Answer as the Hub does for a repo this request may not read; False when it may."""
            access = repo.get("access", "public")
            token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if access in ("gated", "private") and token in repo.get("authorized", []):
                return False
            headers = {"Content-Type": "application/json"}
            if access == "gated" and files:
                status, headers["X-Error-Code"] = 403, "GatedRepo"
            elif access == "private":
                status, headers["X-Error-Code"] = 401, "RepoNotFound"
            elif access == "disabled":
                status, headers["X-Error-Message"] = 403, "Access to this resource is disabled."
            elif access == "gone":
                status, headers["X-Error-Code"] = 404, "RepoNotFound"
            else:
                return False
            self._send(status, json.dumps({"error": access}).encode(), headers, head)
            return True

        def _json(self, obj: Any, headers: dict[str, str] | None = None, fault: dict[str, Any] | None = None) -> None:
            body = json.dumps(obj).encode()
            if fault and fault.get("truncate"):
                body = body[: len(body) // 2]
            self._send(200, body, {"Content-Type": "application/json", **(headers or {})}, stall=fault)

        def _stall(self, fault: dict[str, Any] | None, when: str) -> bool:
            """Hold the connection open without (the rest of) an answer until the server stops."""
            if not fault or fault.get("stall") != when:
                return False
            self.wfile.flush()
            sim.released.wait(600)
            self.close_connection = True
            return True

        def _error(self, fault: dict[str, Any], head: bool = False) -> None:
            headers = {"Content-Type": "application/json"}
            if "retry_after" in fault:
                headers["Retry-After"] = str(fault["retry_after"])
            self._send(fault["status"], json.dumps({"error": "simulated"}).encode(), headers, head)

        def _not_found(self, code: str, head: bool = False) -> None:
            self._send(404, json.dumps({"error": code}).encode(),
                       {"Content-Type": "application/json", "X-Error-Code": code}, head)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            url = urlsplit(self.path)
            path, q = unquote(url.path), parse_qs(url.query)
            if path == "/api/models":
                return self._list(q)
            if path.startswith("/api/models/"):
                return self._model(path[len("/api/models/"):], q)
            parts = path.lstrip("/").split("/", 4)
            if len(parts) == 5 and parts[2] == "resolve":
                return self._file("/".join(parts[:2]), parts[3], parts[4], head)
            self._not_found("NotFound", head)

        def _list(self, q: dict[str, list[str]]) -> None:
            page_size = int(sim.scenario.get("page_size", 1000))
            start = int(q.pop("cursor", ["0"])[0])
            page = start // page_size + 1
            sim.counts["list"] += 1
            fault = sim.fault("list", page=page)
            if fault and "status" in fault:
                return self._error(fault)
            items = _listing(sim, q)
            headers = {}
            if start + page_size < len(items):
                nxt = urlencode([(k, v) for k, vs in q.items() for v in vs] + [("cursor", start + page_size)])
                headers["Link"] = f'<{sim.url}/api/models?{nxt}>; rel="next"'
            self._json(items[start: start + page_size], headers, fault)

        def _model(self, rest: str, q: dict[str, list[str]]) -> None:
            owner, name, *tail = rest.split("/")
            repo = sim.repos.get(f"{owner}/{name}")
            if repo is None:
                return self._not_found("RepoNotFound")
            if tail[:1] == ["tree"]:
                return self._tree(repo, tail[1], "/".join(tail[2:]), q)
            sim.counts["info"] += 1
            if self._refused(repo):
                return None
            rev = tail[1] if tail[:1] == ["revision"] else "main"
            if rev not in ("main", repo["sha"]):
                return self._not_found("RevisionNotFound")
            self._json({"_id": repo["id"], "id": repo["id"], "sha": repo["sha"], "tags": repo.get("tags", []),
                        "lastModified": repo.get("lastModified"),
                        "siblings": [{"rfilename": p} for p in sorted(repo.get("files", {}))]})

        def _tree(self, repo: dict[str, Any], rev: str, prefix: str, q: dict[str, list[str]]) -> None:
            sim.counts["tree"] += 1
            sim.by_repo["tree", repo["id"]] += 1
            if self._refused(repo):
                return None
            fault = sim.fault("tree", repo=repo["id"])
            if fault and "status" in fault:
                return self._error(fault)
            if rev not in ("main", repo["sha"]):
                return self._not_found("RevisionNotFound")
            entries = _tree(repo, prefix.strip("/"), q.get("recursive", ["false"])[0].lower() == "true")
            start = int(q.get("cursor", ["0"])[0])
            headers = {}
            if start + 1000 < len(entries):
                nxt = urlencode({"recursive": q.get("recursive", ["false"])[0], "cursor": start + 1000})
                headers["Link"] = f'<{sim.url}/api/models/{repo["id"]}/tree/{rev}/{quote(prefix, safe="")}?{nxt}>; rel="next"'
            self._json(entries[start: start + 1000], headers, fault)

        def _file(self, repo_id: str, rev: str, path: str, head: bool) -> None:
            kind = "head" if head else "file"
            sim.counts[kind] += 1
            sim.by_repo[kind, repo_id] += 1
            repo = sim.repos.get(repo_id)
            if repo is None:
                return self._not_found("RepoNotFound", head)
            if self._refused(repo, head, files=True):
                return None
            fault = sim.fault(kind, repo=repo_id)
            if fault and "status" in fault:
                return self._error(fault, head)
            if rev not in ("main", repo["sha"]):
                return self._not_found("RevisionNotFound", head)
            if path not in repo.get("files", {}):
                return self._not_found("EntryNotFound", head)
            body = file_bytes(repo["files"][path])
            etag = hashlib.sha256(body).hexdigest()
            self._send(200, body, {"X-Repo-Commit": repo["sha"], "ETag": f'"{etag}"',
                                   "Content-Type": "application/octet-stream"}, head, stall=fault)

    return Handler


# --- running `sasgate watch` against the imitation, in a subprocess ---------------------------

# The real client, with its retry sleeps recorded instead of slept (listing and tree calls wait
# 1, 2, 4, 8, 8 s, or Retry-After + 1 s): tests see what it would have waited without paying it.
_BOOT = """
import atexit, json, sys, time
import huggingface_hub.utils._http as _http
class _Clock:
    def __getattr__(self, name): return getattr(time, name)
    def sleep(self, s): slept.append(s)
slept = []
_http.time = _Clock()
_out = sys.argv[1]
atexit.register(lambda: open(_out, "w").write(json.dumps(slept)))
from sasgate.cli import main
sys.argv = ["sasgate", *sys.argv[2:]]
main()
"""


def hub_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    """The environment a watcher needs to talk to `endpoint` only: HF_ENDPOINT is read at import."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(hf_home),
                  "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def watch_command(slept_file: Path, *args: str) -> list[str]:
    import sys

    return [sys.executable, "-c", _BOOT, str(slept_file), "watch", *args]
