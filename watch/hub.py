"""Enumerate SAE releases on the Hub with `huggingface_hub` only, incrementally by repo sha.

One poll: `list_models` per configured author, tag and search (with `expand` for sha,
lastModified, library_name and tags); every listed repo whose sha differs from the previous
poll's is read at that sha: `list_repo_tree` for its files, `hf_hub_download` for the small
config files its layout declares. A repo whose sha is unchanged is not read again and its
descriptors come from the previous poll, unless its record was read by another PARSER_VERSION
or the Hub refused it (gated, disabled, private or gone: `retry` in its record), in which case
it is read again. A refusal is a skip with the reason, never an outage; anything else the client
cannot read (network error, HTTP 5xx/429 after the client's own retries, malformed JSON, a
request stalled past `watch.timeout_s`) raises Unreachable, so a caller never mistakes an
unreadable Hub for an empty one. `HF_ENDPOINT` (mirrors) and `HF_TOKEN` are read by the client.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from sasgate.errors import HubUnreachableError

from . import configs, layouts
from .client import bound_requests
from .descriptors import SaeDescriptor, Skipped, hook_name, is_pickle_name
from .settings import WatchParams
from .state import RepoRecord

EXPAND = ["sha", "lastModified", "library_name", "tags"]
_QUERY_KEYWORD = {"author": "author", "tag": "filter", "search": "search"}
_WEIGHT_SUFFIXES = (".safetensors", ".npz")
READERS = 8  # repos read in parallel (each read is a few small requests)
# Bump when the way files are read changes (a layout, the width rule): records of another
# version are read again at their sha. 2: Gemma Scope widths are powers of two (65k = 65536).
PARSER_VERSION = 2
T = TypeVar("T")


@dataclass
class Listed:
    """A repo as the listing shows it, and which queries found it."""

    sha: str
    last_modified: str | None
    tags: list[str]
    library_name: str | None
    scopes: set[str] = field(default_factory=set)


@dataclass
class HubResult:
    repos: dict[str, RepoRecord]  # repo id -> state record (sha, listing facts, descriptors, skipped)
    descriptors: list[SaeDescriptor]
    skipped: list[Skipped]
    reread: list[str]  # repos read this poll: new sha, refused before, or another parser version
    how: str


def _unreachable(what: str, exc: BaseException) -> HubUnreachableError:
    return HubUnreachableError(f"{what}: {type(exc).__name__}: {exc}")


def _client_errors() -> tuple[type[BaseException], ...]:
    """Everything that means "the Hub could not be read" (not "this repo has no SAE")."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    return (HfHubHTTPError, LocalEntryNotFoundError, httpx2.HTTPError, json.JSONDecodeError, OSError)


def _refusal(exc: BaseException) -> str | None:
    """Why the Hub refused this repo or file, or None when it did not (then the Hub could not be read).

    Refusals are answers about one repo: gated without access, disabled, private or gone (401,
    403, 404, a revision force-pushed away); the repo is read again on the next poll. The client
    may wrap them (hf_hub_download raises LocalEntryNotFoundError from a refused HEAD), so the
    causes are followed."""
    from huggingface_hub.errors import (DisabledRepoError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    seen: BaseException | None = exc
    chain: set[int] = set()
    while seen is not None and id(seen) not in chain:
        chain.add(id(seen))
        status = seen.response.status_code if isinstance(seen, HfHubHTTPError) and seen.response is not None else None
        if isinstance(seen, GatedRepoError):
            return f"gated: no access with this token (HTTP {status})"
        if isinstance(seen, DisabledRepoError):
            return f"disabled: Access to this resource is disabled (HTTP {status})"
        if isinstance(seen, RevisionNotFoundError):
            return "the listed revision is gone (force-pushed since the listing)"
        if isinstance(seen, RepositoryNotFoundError):
            return f"not found, or private without access (HTTP {status})"
        if status in (401, 403, 404):
            return f"refused (HTTP {status})"
        seen = seen.__cause__ or seen.__context__
    return None


def _file_gone() -> type[BaseException]:
    """A file the tree listed is not served at that commit: permanent at this sha (read again when it changes)."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    return RemoteEntryNotFoundError


class _Refused(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def list_repos(api: Any, settings: WatchParams) -> dict[str, Listed]:
    """Every repo any query lists, with its sha; the listing pages are followed by the client."""
    out: dict[str, Listed] = {}
    for kind, value in settings.queries():
        what = f"listing models ({kind}={value})"
        try:
            for m in api.list_models(**{_QUERY_KEYWORD[kind]: value}, sort="last_modified", expand=EXPAND):
                if not m.sha:
                    raise HubUnreachableError(f"{what}: the Hub listed {m.id} without a sha")
                last = m.last_modified.isoformat() if m.last_modified else None
                listed = out.setdefault(m.id, Listed(m.sha, last, sorted(m.tags or []), m.library_name))
                listed.scopes.add(f"{kind}:{value}")
        except HubUnreachableError:
            raise
        except _client_errors() as exc:
            raise _unreachable(what, exc) from exc
    return out


def _with_retries(settings: WatchParams, what: str, fn: Callable[[], T]) -> T:
    """Our bounded retries with backoff for calls the client does not retry (file downloads).
    A refusal or a file gone is an answer, raised at once for the caller to record as a skip."""
    for attempt in range(settings.retries + 1):
        try:
            return fn()
        except _file_gone():
            raise
        except _client_errors() as exc:
            if (reason := _refusal(exc)) is not None:
                raise _Refused(reason) from exc
            if attempt == settings.retries:
                raise _unreachable(what, exc) from exc
            time.sleep(settings.backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class _RepoReader:
    """Reads one repo at one sha into descriptors and skips."""

    def __init__(self, api: Any, settings: WatchParams, repo: str, listed: Listed):
        self.api, self.settings, self.repo, self.listed = api, settings, repo, listed
        self.found: list[SaeDescriptor] = []
        self.skipped: list[Skipped] = []
        self.files: list[str] = []
        self.retry: str | None = None  # why the Hub refused part of it: read again on the next poll

    def _refused(self, where: str, reason: str) -> None:
        self.retry = self.retry or reason
        self.skipped.append(Skipped(where=where, reason=f"not readable: {reason}; read again on every poll until "
                                    "it is"))

    def read(self) -> None:
        try:
            files = self._files()
        except _Refused as exc:
            self._refused(self.repo, exc.reason)
            return
        if files is None:
            return
        self.files = files
        consumed = self._parse(files)
        weights = sorted({posixpath.dirname(f) for f in files if f not in consumed
                          and (f.endswith(_WEIGHT_SUFFIXES) or is_pickle_name(f))})
        if not self.found and not self.skipped:
            sample = ", ".join(sorted(files)[:3])
            self.skipped.append(Skipped(where=self.repo, reason=f"no SAE layout sasgate reads ({len(files)} files: "
                                        f"{sample}{', ...' if len(files) > 3 else ''})"))
        elif weights:
            for folder in weights:
                self.skipped.append(Skipped(where=f"{self.repo}/{folder or '.'}", reason="weights in a layout "
                                            "sasgate does not read (not guessed)"))

    def _files(self) -> list[str] | None:
        from huggingface_hub import RepoFile

        files: list[str] = []
        what = f"reading the file tree of {self.repo}@{self.listed.sha[:12]}"
        try:
            for entry in self.api.list_repo_tree(self.repo, revision=self.listed.sha, recursive=True):
                if isinstance(entry, RepoFile):
                    files.append(entry.path)
                if len(files) > self.settings.max_files_per_repo:
                    self.skipped.append(Skipped(where=self.repo, reason=f"more than {len(files) - 1} files "
                                                "(watch.max_files_per_repo): not read"))
                    return None
        except _client_errors() as exc:
            if (reason := _refusal(exc)) is not None:
                raise _Refused(reason) from exc
            raise _unreachable(what, exc) from exc
        return files

    def _json(self, path: str) -> dict[str, Any] | None:
        """A small config file at the listed sha (cached by commit: a re-read makes no request)."""
        from huggingface_hub import hf_hub_download

        try:
            local = _with_retries(self.settings, f"downloading {self.repo}/{path}",
                                  lambda: hf_hub_download(self.repo, path, revision=self.listed.sha))
        except _Refused as exc:
            self._refused(f"{self.repo}/{path}", exc.reason)
            return None
        except _file_gone() as exc:
            self.skipped.append(Skipped(where=f"{self.repo}/{path}", reason=f"not served at this commit "
                                        f"({type(exc).__name__})"))
            return None
        try:
            with open(local, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            self.skipped.append(Skipped(where=f"{self.repo}/{path}", reason=f"not valid JSON ({exc})"))
            return None
        if not isinstance(data, dict):
            self.skipped.append(Skipped(where=f"{self.repo}/{path}", reason="not a JSON object"))
            return None
        return data

    def _model_from_tags(self) -> str | None:
        bases = [t.split(":", 1)[1] for t in self.listed.tags if t.startswith("base_model:") and t.count(":") == 1]
        return bases[0] if len(bases) == 1 else None

    def _add(self, layout: str, folder: str, weights: str, model: str | None, hook_source: str, layer: int,
             site: str, width: int | None = None, architecture: str | None = None, l0: float | None = None) -> None:
        if not model:
            self.skipped.append(Skipped(where=f"{self.repo}/{folder}", reason=f"{layout} layout, but neither the "
                                        "config nor a single base_model tag declares the model it was trained on"))
            return
        self.found.append(SaeDescriptor(
            source="hub", layout=layout, repo=self.repo, revision=self.listed.sha, path=folder, model=model,
            hook_name=hook_name(layer, site), hook_source=hook_source, layer=layer, site=site, width=width,
            architecture=architecture, l0=l0, weights=weights, scopes=tuple(sorted(self.listed.scopes))))

    def _declared(self, layout: str, folder: str, cfg_file: str, weights: str,
                  parse: Callable[[dict[str, Any]], configs.Declared]) -> None:
        cfg = self._json(cfg_file)
        if cfg is None:
            return
        try:
            d = parse(cfg)
        except ValueError as exc:
            self.skipped.append(Skipped(where=f"{self.repo}/{cfg_file}", reason=str(exc), model=cfg.get("model_name")
                                        if isinstance(cfg.get("model_name"), str) else None))
            return
        self._add(layout, folder, weights, d.model, posixpath.basename(cfg_file), d.layer, d.site, d.width,
                  d.architecture, d.l0)

    def _parse(self, files: list[str]) -> set[str]:
        """Turn the files into descriptors by layout; returns the files a layout accounted for."""
        by_dir: dict[str, set[str]] = defaultdict(set)
        for f in files:
            by_dir[posixpath.dirname(f)].add(posixpath.basename(f))
        consumed: set[str] = set()
        tag_model = self._model_from_tags()
        gemma = layouts.gemma_scope_repo_model(self.repo)
        gemma2 = layouts.gemma_scope_2_repo_model(self.repo)
        for folder, names in sorted(by_dir.items()):
            consumed |= self._folder(folder, names, tag_model, gemma, gemma2)
        return consumed

    def _folder(self, folder: str, names: set[str], tag_model: str | None, gemma: tuple[str, str] | None,
                gemma2: str | None) -> set[str]:
        """One folder's layout; returns the files (repo paths) it accounted for."""
        def join(name: str) -> str:
            return posixpath.join(folder, name)

        here = {join(n) for n in names}
        pickles = sorted(n for n in names if is_pickle_name(n))
        if "cfg.json" in names and "sae_weights.safetensors" in names:
            self._declared("sae_lens", folder, join("cfg.json"), join("sae_weights.safetensors"), configs.sae_lens_cfg)
            return here
        if "cfg.json" in names and "sae.safetensors" in names:
            self._declared("sparsify", folder, join("cfg.json"), join("sae.safetensors"),
                           lambda cfg: configs.sparsify_cfg(folder, cfg, tag_model))
            return here
        if "hyperparams.json" in names and layouts.llama_scope(folder):
            under = sorted(f for f in self.files if f.startswith(folder + "/"))  # checkpoints/final.safetensors
            weights = [f for f in under if f.endswith(".safetensors")]
            if weights:
                self._declared("llama_scope", folder, join("hyperparams.json"), weights[-1],
                               lambda cfg: configs.llama_scope_cfg(cfg, tag_model))
            else:
                self.skipped.append(Skipped(where=f"{self.repo}/{folder}", reason="Llama Scope layout without "
                                            "safetensors weights (pickle or none); sasgate refuses pickles"))
            return here | set(under)
        if "params.npz" in names and gemma and (named := layouts.gemma_scope(folder, gemma[1])):
            self._add("gemma_scope", folder, join("params.npz"), gemma[0], named.convention, named.layer, named.site,
                      named.width, "jumprelu", named.l0)
            return here
        if "params.safetensors" in names and gemma2 and (named := layouts.gemma_scope_2(folder)):
            self._add("gemma_scope_2", folder, join("params.safetensors"), gemma2, named.convention, named.layer,
                      named.site, named.width, "jumprelu", named.l0)
            return here
        if pickles and ("cfg.json" in names or "hyperparams.json" in names):
            self.skipped.append(Skipped(where=f"{self.repo}/{folder}", reason=f"weights only as pickle "
                                        f"({', '.join(pickles)}); sasgate refuses pickles"))
            return here
        return set()


def read_hub(settings: WatchParams, previous: dict[str, RepoRecord]) -> HubResult:
    """One pass over the Hub; `previous` is the last poll's per-repo records (reused when the sha is unchanged)."""
    from huggingface_hub import HfApi

    bound_requests(settings.timeout_s)
    api = HfApi()
    listing = list_repos(api, settings)
    changed = sorted(r for r, lst in listing.items() if _stale(previous.get(r), lst))
    read = _read_all(api, settings, {r: listing[r] for r in changed})
    repos: dict[str, RepoRecord] = {}
    for repo, lst in sorted(listing.items()):
        record = read.get(repo) or previous[repo]
        repos[repo] = record.model_copy(update={"last_modified": lst.last_modified, "tags": lst.tags,
                                                "library_name": lst.library_name, "scopes": sorted(lst.scopes)})
    descriptors = [d for r in repos.values() for d in r.descriptors]
    skipped = [s for r in repos.values() for s in r.skipped]
    retried = sum(1 for r in changed if r in previous and previous[r].sha == listing[r].sha)
    how = (f"Hub ({len(settings.queries())} queries: {', '.join(f'{k}:{v}' for k, v in settings.queries())}): "
           f"{len(repos)} repos listed, {len(changed)} read ({retried} of them again at the same sha: refused "
           "before, or read by another parser version)")
    return HubResult(repos, descriptors, skipped, changed, how)


def _stale(record: RepoRecord | None, listed: Listed) -> bool:
    """Read this repo now: new, a new sha, refused last time, or read by another parser version."""
    return record is None or record.sha != listed.sha or record.retry is not None or record.parser != PARSER_VERSION


def _read_all(api: Any, settings: WatchParams, todo: dict[str, Listed]) -> dict[str, RepoRecord]:
    """Read repos in parallel; the first Unreachable cancels the reads not yet started (each running one is
    bounded by watch.timeout_s per wait), so a stalled Hub ends the poll in about that time."""
    with ThreadPoolExecutor(READERS) as pool:
        futures: dict[str, Future[RepoRecord]] = {r: pool.submit(_read_one, api, settings, r, lst)
                                                  for r, lst in todo.items()}
        try:
            return {r: f.result() for r, f in futures.items()}
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _read_one(api: Any, settings: WatchParams, repo: str, listed: Listed) -> RepoRecord:
    reader = _RepoReader(api, settings, repo, listed)
    reader.read()
    return RepoRecord(sha=listed.sha, parser=PARSER_VERSION, retry=reader.retry,
                      descriptors=sorted(reader.found, key=lambda d: d.id), skipped=sorted(reader.skipped, key=str),
                      last_modified=listed.last_modified, tags=listed.tags, library_name=listed.library_name,
                      scopes=sorted(listed.scopes))
