"""The locked evaluation set: resolution, leakage checks and the lock file.

`resolve_eval_set(params, paths)` turns `params.eval` into a flat, deterministically
ordered list of `EvalItem`s, one per (split, label, source, paraphrase set):

* `toy` (default): (verb, object) pairs of the toy grammar, partitioned exactly as
  the model stage partitions them (`grammar.partition_pairs`), worded by the toy
  templates; paraphrase set k uses the (seeded) base template + k.
* `builtin`: the natural-language set in `data/eval/{harmful,harmless}.jsonl`.
* `custom`: files (AdvBench / JailbreakBench CSV, JSONL, CSV) or HF datasets
  pinned to a commit.

For builtin and custom sets a seeded shuffle per class assigns sources to the
eval split (the first `n_eval`) and the selection split (the next `n_selection`).
Selection and eval must be disjoint by normalized text and by source id
(`check_leakage`, called before resolution returns).

The lock (`data/eval.lock`) records the sha256 of the items' canonical JSONL
(`canonical_jsonl`: one JSON object per line, sorted keys, separators `(",", ":")`,
UTF-8, each line ending in `\\n`) and the sha256 of each item's line (without its
newline), so a later mismatch can name the items that changed. The lock helpers
(`write_lock`, `read_lock`, `verify_lock`) are generic over a list of dicts and a
lock path; the eval-set functions (`eval_digest`, `check_lock`, `relock`) are thin
wrappers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from .artifacts import atomic_write_json, read_json, read_text, sha256_bytes
from .errors import ArtifactError, DataError, LeakageError, LockedSetError, ParamsError
from .params import EvalParams, FileSource, HubSource, Params
from .paths import Paths
from .toy import grammar

log = logging.getLogger(__name__)

EVAL_LOCK_SCHEMA = "sasgate.evallock/1"
RELOCK_HINT = "sasgate lock --reason TEXT"
LABELS: tuple[Literal["harmful", "harmless"], ...] = ("harmful", "harmless")
SPLITS: tuple[Literal["eval", "selection"], ...] = ("eval", "selection")  # sorted order
BUILTIN_DIR = "eval"  # under paths.data
_LOCK_KEYS = ("schema", "sha256", "n_items", "counts", "source", "items", "history")
_EXAMPLES = 3

Split = Literal["selection", "eval"]
Label = Literal["harmful", "harmless"]


class EvalItem(BaseModel):
    """One instruction of the evaluation set."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str = Field(min_length=1)  # "eval/harmful/017/p1": split/label/source index/paraphrase set
    source_id: str = Field(min_length=1)  # shared by the paraphrase sets of one source
    split: Split
    label: Label
    paraphrase_set: int = Field(ge=0)  # 0: original wording; 1..n: paraphrase sets
    text: str = Field(min_length=1)


def item_id(split: str, label: str, index: int, paraphrase_set: int) -> str:
    return f"{split}/{label}/{index:03d}/p{paraphrase_set}"


# ---------------------------------------------------------------------------
# normalization and leakage


_QUOTES = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u0060": "'", "\u00b4": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    }
)
_TRAILING_PUNCT = re.compile(r"[\s.!?,;:\u2026]+$")


def normalize(text: str) -> str:
    """The form used for leakage checks and de-duplication.

    NFKC, curly quotes and apostrophes made straight, lowercased, whitespace
    collapsed, trailing sentence punctuation (. ! ? , ; : ...) stripped.
    """
    t = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    t = " ".join(t.split())
    return _TRAILING_PUNCT.sub("", t)


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def check_leakage(items: Sequence[EvalItem]) -> None:
    """Raise LeakageError unless selection and eval are disjoint by normalized text and by source id."""
    by_text: dict[str, dict[str, list[EvalItem]]] = {"selection": {}, "eval": {}}
    by_source: dict[str, dict[str, list[EvalItem]]] = {"selection": {}, "eval": {}}
    for it in items:
        by_text[it.split].setdefault(normalize(it.text), []).append(it)
        by_source[it.split].setdefault(it.source_id, []).append(it)

    text_leaks = sorted(set(by_text["selection"]) & set(by_text["eval"]))
    source_leaks = sorted(set(by_source["selection"]) & set(by_source["eval"]))
    if not text_leaks and not source_leaks:
        return

    parts: list[str] = []
    if text_leaks:
        ex = []
        for norm in text_leaks[:_EXAMPLES]:
            sel, ev = by_text["selection"][norm][0], by_text["eval"][norm][0]
            ex.append(f"{sel.id} {_short(sel.text)} = {ev.id} {_short(ev.text)}")
        more = f" and {len(text_leaks) - _EXAMPLES} more" if len(text_leaks) > _EXAMPLES else ""
        parts.append(f"{len(text_leaks)} text(s) appear in both splits: " + "; ".join(ex) + more)
    if source_leaks:
        ex = []
        for sid in source_leaks[:_EXAMPLES]:
            sel_ids = ", ".join(i.id for i in by_source["selection"][sid][:2])
            ev_ids = ", ".join(i.id for i in by_source["eval"][sid][:2])
            ex.append(f"source {sid!r} in selection ({sel_ids}) and eval ({ev_ids})")
        more = f" and {len(source_leaks) - _EXAMPLES} more" if len(source_leaks) > _EXAMPLES else ""
        parts.append(f"{len(source_leaks)} source id(s) span both splits: " + "; ".join(ex) + more)
    raise LeakageError(
        "evaluation-set leakage: the selection split (used to pick directions and features) and the eval "
        "split must be disjoint, but " + "; and ".join(parts)
    )


def _check_label_conflicts(items: Sequence[EvalItem]) -> None:
    seen: dict[str, EvalItem] = {}
    bad: list[tuple[EvalItem, EvalItem]] = []
    for it in items:
        other = seen.setdefault(normalize(it.text), it)
        if other.label != it.label:
            bad.append((other, it))
    if bad:
        ex = "; ".join(f"{a.id} {_short(a.text)} = {b.id} {_short(b.text)}" for a, b in bad[:_EXAMPLES])
        raise DataError(f"{len(bad)} instruction(s) appear as both harmful and harmless: {ex}")


# ---------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class _Record:
    key: str  # stable within its source: a JSONL id or a row/line number
    text: str
    paraphrases: tuple[str, ...]


@dataclass
class _Loaded:
    description: str
    origin: str  # used in source ids
    records: list[_Record]
    has_paraphrases: bool
    rows: int = 0
    empty_dropped: int = 0
    filtered_out: int = 0
    duplicates_dropped: int = 0


@dataclass(frozen=True)
class EvalResolution:
    """The resolved items plus what resolution did to each class's source (recorded in the lock)."""

    items: list[EvalItem]
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _resolve_path(path: str, paths: Paths) -> Path:
    p = Path(path)
    return p if p.is_absolute() else paths.root / p


def _str_or_error(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _read_jsonl(file: Path, column: str, what: str, *, require_id: bool = False) -> _Loaded:
    records: list[_Record] = []
    has_par = False
    rows = empty = 0
    keys: set[str] = set()
    try:
        with open(file, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{what}: {file.name} line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                rows += 1
                if column not in obj:
                    raise DataError(f"{where}: no field {column!r} (fields: {', '.join(sorted(obj))})")
                text = _str_or_error(obj[column], where, f"field {column!r}")
                if "id" in obj:
                    key = str(obj["id"])
                elif require_id:
                    raise DataError(f"{where}: no field 'id'")
                else:
                    key = f"line{lineno}"
                if key in keys:
                    raise DataError(f"{where}: repeated id {key!r}")
                keys.add(key)
                paraphrases: list[str] = []
                if "paraphrases" in obj:
                    has_par = True
                    if not isinstance(obj["paraphrases"], list):
                        raise DataError(f"{where}: 'paraphrases' must be a list of strings")
                    paraphrases = [_str_or_error(p, where, "each paraphrase").strip() for p in obj["paraphrases"]]
                    if any(not p for p in paraphrases):
                        raise DataError(f"{where}: empty paraphrase")
                if not text.strip():
                    empty += 1
                    continue
                records.append(_Record(key, text.strip(), tuple(paraphrases)))
    except FileNotFoundError:
        raise DataError(f"{what}: file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{what}: cannot read {file}: {exc}") from None
    return _Loaded(f"jsonl:{file.name}", file.name, records, has_par, rows=rows, empty_dropped=empty)


def _read_csv(file: Path, column: str, what: str, fmt: str) -> _Loaded:
    records: list[_Record] = []
    rows = empty = 0
    try:
        with open(file, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            if column not in fields:
                raise DataError(
                    f"{what}: {fmt} file {file.name} has no column {column!r} (columns: {', '.join(fields) or 'none'})"
                )
            for rowno, row in enumerate(reader, start=1):
                rows += 1
                text = row.get(column) or ""
                if not text.strip():
                    empty += 1
                    continue
                records.append(_Record(f"row{rowno}", text.strip(), ()))
    except FileNotFoundError:
        raise DataError(f"{what}: file not found: {file}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{what}: cannot read {fmt} file {file}: {exc}") from None
    return _Loaded(f"{fmt}:{file.name}", file.name, records, False, rows=rows, empty_dropped=empty)


_DEFAULT_COLUMN = {"advbench": "goal", "jailbreakbench": "Goal", "jsonl": "instruction", "csv": "instruction"}


def _load_file(src: FileSource, paths: Paths, what: str) -> _Loaded:
    file = _resolve_path(src.path, paths)
    column = src.column or _DEFAULT_COLUMN[src.format]
    if src.format == "jsonl":
        loaded = _read_jsonl(file, column, what)
    else:
        loaded = _read_csv(file, column, what, src.format)
    loaded.description = f"{src.format}:{src.path}"
    return loaded


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_offline() -> bool:
    if _truthy_env("HF_HUB_OFFLINE") or _truthy_env("HF_DATASETS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        return False


def _load_hub(src: HubSource, what: str) -> _Loaded:
    """Load one column of a pinned HF dataset; every failure is a DataError naming repo and revision."""
    name = f"HF dataset {src.repo!r} at revision {src.revision}" + (f" (subset {src.subset!r})" if src.subset else "")
    offline = _hub_offline()
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{what}: loading {name} needs the `datasets` package ({exc})") from None
    if not offline:
        # A fast reachability probe: `datasets` itself retries a dead endpoint for ~25 s.
        from huggingface_hub import HfApi, constants

        try:
            HfApi().dataset_info(src.repo, revision=src.revision, timeout=10)
        except Exception as exc:
            raise DataError(
                f"{what}: cannot reach {name} on {constants.ENDPOINT}: {type(exc).__name__}: {exc}; "
                "if it is in the local cache, set HF_HUB_OFFLINE=1 to use the cached copy"
            ) from None
    try:
        ds = datasets.load_dataset(src.repo, src.subset, revision=src.revision, split=src.split)
    except Exception as exc:
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise DataError(
            f"{what}: could not load split {src.split!r} of {name}{hint}: {type(exc).__name__}: {exc}"
        ) from None
    columns = list(getattr(ds, "column_names", None) or [])
    for col in (src.column, src.filter_empty_column):
        if col is not None and col not in columns:
            raise DataError(f"{what}: {name} split {src.split!r} has no column {col!r} (columns: {', '.join(columns)})")
    texts = ds[src.column]
    keep_mask = [True] * len(texts)
    filtered = 0
    if src.filter_empty_column is not None:
        other = ds[src.filter_empty_column]
        keep_mask = [v is None or (isinstance(v, str) and not v.strip()) for v in other]
        filtered = keep_mask.count(False)
    records: list[_Record] = []
    empty = 0
    for rowno, (text, keep) in enumerate(zip(texts, keep_mask)):
        if not keep:
            continue
        if not isinstance(text, str):
            raise DataError(f"{what}: {name} row {rowno} column {src.column!r} is {type(text).__name__}, not text")
        if not text.strip():
            empty += 1
            continue
        records.append(_Record(f"row{rowno}", text.strip(), ()))
    desc = f"hub:{src.repo}@{src.revision}" + (f"/{src.subset}" if src.subset else "") + f":{src.split}"
    return _Loaded(desc, src.repo, records, False, rows=len(texts), empty_dropped=empty, filtered_out=filtered)


def _dedupe(loaded: _Loaded) -> None:
    seen: set[str] = set()
    kept: list[_Record] = []
    for rec in loaded.records:
        norm = normalize(rec.text)
        if norm in seen:
            continue
        seen.add(norm)
        kept.append(rec)
    loaded.duplicates_dropped = len(loaded.records) - len(kept)
    loaded.records = kept


def _check_paraphrases(loaded: _Loaded, n: int, what: str) -> None:
    for rec in loaded.records:
        norms = [normalize(rec.text), *(normalize(p) for p in rec.paraphrases)]
        if len(set(norms)) != len(norms):
            raise DataError(f"{what}: source {rec.key!r} ({loaded.description}) repeats a wording among its paraphrases")
    if n == 0:
        return
    if not loaded.has_paraphrases:
        raise ParamsError(
            f"eval.n_paraphrases = {n}, but {what} ({loaded.description}) has no paraphrases, so it gives only "
            "paraphrase set 0; set eval.n_paraphrases: 0 or use a JSONL source with a 'paraphrases' list"
        )
    short = [r for r in loaded.records if len(r.paraphrases) < n]
    if short:
        ex = ", ".join(f"{r.key!r} ({len(r.paraphrases)})" for r in short[:_EXAMPLES])
        raise ParamsError(
            f"eval.n_paraphrases = {n}, but {len(short)} source(s) of {what} ({loaded.description}) have fewer "
            f"paraphrases: {ex}"
        )


def _assign(loaded: _Loaded, label: str, ev: EvalParams, what: str) -> dict[str, list[_Record]]:
    need = ev.n_eval + ev.n_selection
    have = len(loaded.records)
    if have < need:
        raise ParamsError(
            f"{what} ({loaded.description}) has {have} distinct {label} sources, but eval.n_eval ({ev.n_eval}) + "
            f"eval.n_selection ({ev.n_selection}) = {need} are needed"
        )
    order = list(range(have))
    random.Random(f"{ev.seed}:eval-split:{label}").shuffle(order)
    return {
        "eval": [loaded.records[i] for i in sorted(order[: ev.n_eval])],
        "selection": [loaded.records[i] for i in sorted(order[ev.n_eval : need])],
    }


def _summary(loaded: _Loaded, n_paraphrases: int) -> dict[str, Any]:
    return {
        "source": loaded.description,
        "rows": loaded.rows,
        "empty_dropped": loaded.empty_dropped,
        "filtered_out": loaded.filtered_out,
        "duplicates_dropped": loaded.duplicates_dropped,
        "distinct": len(loaded.records),
        "has_paraphrases": loaded.has_paraphrases,
        "paraphrase_sets": n_paraphrases + 1,
    }


def _resolve_toy(params: Params) -> EvalResolution:
    ev = params.eval
    n_templates = len(grammar.TEMPLATES)
    if ev.n_paraphrases + 1 > n_templates:
        raise ParamsError(
            f"eval.n_paraphrases = {ev.n_paraphrases}: the toy grammar has {n_templates} templates, so at most "
            f"{n_templates - 1} paraphrase sets"
        )
    try:
        parts = grammar.partition_pairs(ev.seed, ev.n_eval, ev.n_selection, params.model.toy.n_validation)
    except ValueError as exc:
        raise ParamsError(
            f"eval.n_eval ({ev.n_eval}) + eval.n_selection ({ev.n_selection}) + model.toy.n_validation "
            f"({params.model.toy.n_validation}) do not fit the toy grammar: {exc}"
        ) from None
    items: list[EvalItem] = []
    for split in SPLITS:
        for label in LABELS:
            pairs = [p for p in parts[split] if p.label == label]
            for index, pair in enumerate(pairs):
                base = random.Random(f"{ev.seed}:template:{pair.source_id}").randrange(n_templates)
                for k in range(ev.n_paraphrases + 1):
                    items.append(
                        EvalItem(
                            id=item_id(split, label, index, k),
                            source_id=pair.source_id,
                            split=split,
                            label=label,
                            paraphrase_set=k,
                            text=grammar.instruction(pair, base + k),
                        )
                    )
    sources = {
        label: {
            "source": "toy",
            "pairs": len(grammar.all_pairs(label)),
            "has_paraphrases": True,
            "paraphrase_sets": ev.n_paraphrases + 1,
        }
        for label in LABELS
    }
    return EvalResolution(items, sources, [])


def _resolve_sources(params: Params, paths: Paths) -> EvalResolution:
    ev = params.eval
    items: list[EvalItem] = []
    sources: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for label in LABELS:
        if ev.source == "builtin":
            what = f"builtin eval set ({label})"
            file = paths.data / BUILTIN_DIR / f"{label}.jsonl"
            loaded = _read_jsonl(file, "instruction", what, require_id=True)
            loaded.description = f"builtin:{paths.rel(file) if file.is_relative_to(paths.root) else file}"
            loaded.origin = "builtin"
        else:
            src = getattr(ev, label)
            what = f"eval.{label}"
            loaded = _load_file(src, paths, what) if isinstance(src, FileSource) else _load_hub(src, what)
        _dedupe(loaded)
        if loaded.duplicates_dropped:
            notes.append(
                f"{what}: dropped {loaded.duplicates_dropped} exact duplicate(s) (by normalized text) "
                f"from {loaded.description}"
            )
        if loaded.empty_dropped:
            notes.append(f"{what}: dropped {loaded.empty_dropped} empty instruction(s) from {loaded.description}")
        if loaded.filtered_out:
            notes.append(f"{what}: filter_empty_column dropped {loaded.filtered_out} row(s) from {loaded.description}")
        if not loaded.has_paraphrases:
            notes.append(f"{what}: {loaded.description} has no paraphrases; only paraphrase set 0")
        _check_paraphrases(loaded, ev.n_paraphrases, what)
        assigned = _assign(loaded, label, ev, what)
        for split in SPLITS:
            for index, rec in enumerate(assigned[split]):
                source_id = (
                    f"builtin:{rec.key}" if ev.source == "builtin" else f"{label}:{loaded.origin}:{rec.key}"
                )
                wordings = (rec.text, *rec.paraphrases)
                for k in range(ev.n_paraphrases + 1):
                    items.append(
                        EvalItem(
                            id=item_id(split, label, index, k),
                            source_id=source_id,
                            split=split,
                            label=label,
                            paraphrase_set=k,
                            text=wordings[k],
                        )
                    )
        sources[label] = _summary(loaded, ev.n_paraphrases)
    return EvalResolution(items, sources, notes)


def _sort_key(item: EvalItem) -> tuple[str, str, int, int]:
    index = int(item.id.split("/")[2])
    return (item.split, item.label, index, item.paraphrase_set)


def resolve(params: Params, paths: Paths) -> EvalResolution:
    """Resolve params.eval into items (sorted by split, label, source index, paraphrase set), checked for leakage."""
    if params.eval.source == "toy":
        res = _resolve_toy(params)
    else:
        res = _resolve_sources(params, paths)
    items = sorted(res.items, key=_sort_key)
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):  # pragma: no cover - ids are built unique
        raise DataError("internal error: repeated eval item ids")
    _check_label_conflicts(items)
    check_leakage(items)
    for note in res.notes:
        log.info(note)
    return EvalResolution(items, res.sources, res.notes)


def resolve_eval_set(params: Params, paths: Paths) -> list[EvalItem]:
    """The evaluation set params.eval describes, deterministic and leakage-checked."""
    return resolve(params, paths).items


def paraphrase_families(params: Params) -> list[dict[str, Any]]:
    """How each declared paraphrase set (1..n; 0 is the original wording) was made, and whether it was held
    out from the model's training and from the selection step: what a robustness claim may name."""
    ev = params.eval
    if ev.source == "toy":
        made = ("the toy grammar's template (base + {k}) mod {n} for each source, the base drawn per source; "
                "the {n} templates are the ones the organism was trained on").format
        trained: bool | None = False
    else:
        where = "data/eval/{{harmful,harmless}}.jsonl" if ev.source == "builtin" else "the eval.harmful/eval.harmless files"
        made = ("the {k}th hand-written paraphrase of each source in " + where).format
        trained = None  # unknown: the model's training data is not ours to inspect
    return [{"paraphrase_set": k, "made_by": made(k=k, n=len(grammar.TEMPLATES)), "held_out_from_training": trained,
             "held_out_from_selection": False,  # the selection split is worded in every paraphrase set too
             } for k in range(1, ev.n_paraphrases + 1)]


def eval_counts(items: Iterable[EvalItem]) -> dict[str, dict[str, int]]:
    """{split: {label: number of items}} (all paraphrase sets counted)."""
    counts: dict[str, dict[str, int]] = {}
    for it in items:
        counts.setdefault(it.split, {}).setdefault(it.label, 0)
        counts[it.split][it.label] += 1
    return {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}


def items_to_records(items: Iterable[EvalItem]) -> list[dict[str, Any]]:
    return [it.model_dump(mode="json") for it in items]


def read_items_jsonl(path: str | os.PathLike) -> list[EvalItem]:
    """Read items written as canonical JSONL (`canonical_jsonl(items_to_records(items))`), validating each."""
    path = Path(path)
    lines = read_text(path, ArtifactError, f"missing artifact {path}").splitlines()
    out = []
    for n, line in enumerate(lines, start=1):
        try:
            out.append(EvalItem.model_validate_json(line))
        except ValueError as exc:
            raise ArtifactError(f"corrupt eval item in {path} line {n}: {exc}") from None
    return out


# ---------------------------------------------------------------------------
# generic locks over a list of JSON records


def canonical_line(record: Mapping[str, Any]) -> str:
    """One record as compact canonical JSON (sorted keys, no spaces), without a newline."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    """Records as canonical JSONL: one canonical line each, every line ending in a newline, UTF-8."""
    return "".join(canonical_line(r) + "\n" for r in records).encode("utf-8")


def records_digest(records: Iterable[Mapping[str, Any]]) -> str:
    """sha256 (hex) of the records' canonical JSONL."""
    return sha256_bytes(canonical_jsonl(records))


def record_digests(records: Iterable[Mapping[str, Any]], key: str = "id") -> dict[str, str]:
    """{record[key]: sha256 of the record's canonical line}; keys must be unique."""
    out: dict[str, str] = {}
    for r in records:
        k = str(r[key])
        if k in out:
            raise DataError(f"records to lock repeat {key} {k!r}")
        out[k] = sha256_bytes(canonical_line(r).encode("utf-8"))
    return out


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_lock(lock_path: str | os.PathLike, *, schema: str, what: str = "locked set") -> dict[str, Any] | None:
    """The lock record, or None when the file does not exist; a malformed lock is a LockedSetError."""
    lock_path = Path(lock_path)
    if not lock_path.exists():
        return None
    try:
        record = read_json(lock_path)
    except ArtifactError as exc:
        raise LockedSetError(f"{what}: {exc}; move it aside and re-lock") from None
    if not isinstance(record, dict) or record.get("schema") != schema:
        found = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise LockedSetError(f"{what}: {lock_path} is not a {schema} lock (schema {found!r})")
    missing = [k for k in _LOCK_KEYS if k not in record]
    if missing or not isinstance(record["items"], dict) or not isinstance(record["history"], list):
        raise LockedSetError(f"{what}: {lock_path} is malformed (missing or invalid: {', '.join(missing) or 'items/history'})")
    return record


def write_lock(lock_path: str | os.PathLike, records: Sequence[Mapping[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """Lock `records` at `lock_path` (atomically), appending {sha256, reason, time} to the history.

    Takes `build_lock`'s arguments; `build_lock` alone makes the record without writing it."""
    record = build_lock(lock_path, records, **kwargs)
    atomic_write_json(lock_path, record)
    return record


def build_lock(
    lock_path: str | os.PathLike,
    records: Sequence[Mapping[str, Any]],
    *,
    schema: str,
    reason: str,
    source: Any,
    counts: Mapping[str, Any],
    key: str = "id",
    extra: Mapping[str, Any] | None = None,
    what: str = "locked set",
) -> dict[str, Any]:
    """The lock record `write_lock` writes (the previous lock's history and this entry), not written."""
    if not isinstance(reason, str) or not reason.strip():
        raise ParamsError(f"{what}: a lock needs a non-empty reason (`{RELOCK_HINT}`)")
    previous = read_lock(lock_path, schema=schema, what=what)
    digest = records_digest(records)
    history = list(previous["history"]) if previous else []
    history.append({"sha256": digest, "reason": reason.strip(), "time": _utc_now()})
    record: dict[str, Any] = dict(extra or {})
    record.update(
        {
            "schema": schema,
            "sha256": digest,
            "n_items": len(records),
            "counts": dict(counts),
            "source": source,
            "items": record_digests(records, key),
            "history": history,
        }
    )
    return record


def _describe_record(r: Mapping[str, Any], show: str) -> str:
    return _short(str(r[show])) if show in r else _short(canonical_line(r))


def verify_lock(
    lock_path: str | os.PathLike,
    records: Sequence[Mapping[str, Any]],
    *,
    schema: str,
    what: str,
    lock_name: str | None = None,
    key: str = "id",
    show: str = "text",
    source: Any = None,
) -> dict[str, Any]:
    """Return the lock record if `records` match it; otherwise raise LockedSetError naming what changed."""
    name = lock_name or str(lock_path)
    lock = read_lock(lock_path, schema=schema, what=f"locked {what}")
    if lock is None:
        raise LockedSetError(f"locked {what}: no lock at {name}: run `{RELOCK_HINT}` to lock the current set")
    digest = records_digest(records)
    if digest == lock["sha256"]:
        return lock
    now = record_digests(records, key)
    before: dict[str, str] = lock["items"]
    by_key = {str(r[key]): r for r in records}
    changed = [k for k in now if k in before and before[k] != now[k]]
    added = [k for k in now if k not in before]
    removed = [k for k in before if k not in now]
    n = len(changed) + len(added) + len(removed)
    examples: list[str] = []
    for k in changed[:_EXAMPLES]:
        examples.append(f"{k} now {_describe_record(by_key[k], show)}")
    for k in added[: max(0, _EXAMPLES - len(examples))]:
        examples.append(f"{k} added {_describe_record(by_key[k], show)}")
    for k in removed[: max(0, _EXAMPLES - len(examples))]:
        examples.append(f"{k} removed")
    if n:
        detail = (
            f"{n} items changed ({len(changed)} modified, {len(added)} added, {len(removed)} removed), "
            f"e.g. {'; '.join(examples)}"
        )
    else:
        detail = "the same items in a different order"
    if source is not None and lock.get("source") != source:
        old, new = lock.get("source"), source
        if isinstance(old, dict) and isinstance(new, dict):
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            detail += f"; the source params changed since the lock ({', '.join(diff)})"
        else:
            detail += "; the source params changed since the lock"
    raise LockedSetError(
        f"locked {what}: the resolved set no longer matches {name} (locked sha256 {lock['sha256']}, now {digest}); "
        f"{detail}; if this change is intended, re-lock with `{RELOCK_HINT}`"
    )


# ---------------------------------------------------------------------------
# the eval-set lock


def eval_digest(items: Sequence[EvalItem]) -> str:
    """sha256 of the items' canonical JSONL (the value `data/eval.lock` records)."""
    return records_digest(items_to_records(items))


def check_lock(items: Sequence[EvalItem], params: Params, paths: Paths) -> dict[str, Any]:
    """Return the lock record if `items` match data/eval.lock; else LockedSetError naming changed items."""
    lock = paths.eval_lock
    name = paths.rel(lock) if lock.is_relative_to(paths.root) else str(lock)
    try:
        return verify_lock(
            lock,
            items_to_records(items),
            schema=EVAL_LOCK_SCHEMA,
            what="evaluation setup",
            lock_name=name,
            source=params.eval.model_dump(mode="json"),
        )
    except LockedSetError as exc:
        msg = str(exc).replace("the resolved set", "the resolved eval set", 1)
        raise LockedSetError(msg) from None


def load_locked_eval_set(params: Params, paths: Paths) -> list[EvalItem]:
    """Resolve the eval set and refuse (LockedSetError) unless it matches data/eval.lock."""
    items = resolve_eval_set(params, paths)
    check_lock(items, params, paths)
    return items


def relock(params: Params, paths: Paths, reason: str) -> dict[str, Any]:
    """Resolve the eval set and write data/eval.lock for it, appending to the lock's history."""
    if not isinstance(reason, str) or not reason.strip():
        raise ParamsError(f"re-locking the evaluation set needs a non-empty reason: `{RELOCK_HINT}`")
    res = resolve(params, paths)
    return write_lock(
        paths.eval_lock,
        items_to_records(res.items),
        schema=EVAL_LOCK_SCHEMA,
        reason=reason,
        source=params.eval.model_dump(mode="json"),
        counts=eval_counts(res.items),
        extra={"resolution": {"sources": res.sources, "notes": res.notes}},
        what="locked evaluation setup",
    )
