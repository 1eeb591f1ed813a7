"""The activation store: one safetensors file per (split, tuple), written as a stream.

Peak memory does not grow with the number of prompts: the file's header is
written first (the token count is known from tokenization), then each batch's
rows are appended at their offset. A file is complete only once renamed into
place by `atomic_dir`, so a killed `collect` never leaves one that looks valid.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ArtifactError
from .paths import Paths

ACTS = "acts"
TOKEN_FIELDS = ("prompt_index", "position", "is_bos", "post_instruction")
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def activation_file(paths: Paths, split: str, tuple_key: str) -> Path:
    return paths.collect_dir / split / f"{tuple_key}.safetensors"


def token_index_file(paths: Paths, split: str) -> Path:
    return paths.collect_dir / split / "tokens.safetensors"


class StreamingTensorWriter:
    """Writes one 2-D tensor named `acts` into a safetensors file, rows appended in order."""

    def __init__(self, path: Path, n_rows: int, n_cols: int, dtype: torch.dtype = torch.float32):
        self.path, self.n_rows, self.n_cols, self.dtype = path, n_rows, n_cols, dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = n_rows * n_cols * self.itemsize
        header = {ACTS: {"dtype": _DTYPES[dtype], "shape": [n_rows, n_cols], "data_offsets": [0, nbytes]}}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self.rows_written = 0

    def write(self, rows: torch.Tensor) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.n_cols:
            raise ValueError(f"expected rows of width {self.n_cols}, got shape {tuple(rows.shape)}")
        if self.rows_written + rows.shape[0] > self.n_rows:
            raise ValueError(f"{self.path.name}: more rows than the declared {self.n_rows}")
        data = rows.detach().to("cpu", self.dtype).contiguous()
        self._fh.write(memoryview(data.view(torch.uint8).numpy()))  # no intermediate bytes copy
        self.rows_written += rows.shape[0]

    def close(self) -> None:
        self._fh.close()
        if self.rows_written != self.n_rows:
            raise ArtifactError(f"{self.path.name}: wrote {self.rows_written} of {self.n_rows} declared rows")


def write_token_index(path: Path, index: dict[str, torch.Tensor]) -> None:
    missing = set(TOKEN_FIELDS) - set(index)
    if missing:
        raise ValueError(f"token index lacks {sorted(missing)}")
    save_file({k: index[k].contiguous() for k in TOKEN_FIELDS}, str(path))


def _open(path: Path):
    if not path.is_file():
        raise ArtifactError(f"missing activation file {path} (run `dvc repro collect`)")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ArtifactError(f"corrupt activation file {path}: {exc}") from None


def load_acts(paths: Paths, split: str, tuple_key: str) -> torch.Tensor:
    """float32 [n_tokens, d_model]: every non-pad prompt token of the split, BOS included."""
    path = activation_file(paths, split, tuple_key)
    with _open(path) as fh:
        try:
            return fh.get_tensor(ACTS)
        except Exception as exc:
            raise ArtifactError(f"corrupt activation file {path}: {exc}") from None


def load_token_index(paths: Paths, split: str) -> dict[str, torch.Tensor]:
    """prompt_index, position (0 = BOS), is_bos, post_instruction (-k..-1, else 0) per stored token."""
    path = token_index_file(paths, split)
    with _open(path) as fh:
        index = {k: fh.get_tensor(k) for k in fh.keys()}
    if set(index) != set(TOKEN_FIELDS):
        raise ArtifactError(f"{path}: expected tensors {list(TOKEN_FIELDS)}, found {sorted(index)}")
    index["is_bos"] = index["is_bos"].bool()
    return index


# --- post-instruction activations at every layer (issue 3: DIM candidates) ---
POST_INSTRUCTION_FILE = "post_instruction_resid_pre.safetensors"


def post_instruction_file(paths: Paths, split: str) -> Path:
    return paths.collect_dir / split / POST_INSTRUCTION_FILE


def save_post_instruction(path: Path, acts: torch.Tensor) -> None:
    """[n_prompts, n_layers, n_post, d_model] float32: resid_pre of every block at the post-instruction
    positions, one row per prompt of the split in items order."""
    if acts.ndim != 4:
        raise ValueError(f"expected [prompts, layers, positions, d_model], got shape {tuple(acts.shape)}")
    save_file({ACTS: acts.to(torch.float32).contiguous()}, str(path))


def load_post_instruction(paths: Paths, split: str) -> torch.Tensor:
    """What `save_post_instruction` wrote for the split; a missing or malformed file is an ArtifactError."""
    path = post_instruction_file(paths, split)
    with _open(path) as fh:
        try:
            acts = fh.get_tensor(ACTS)
        except Exception as exc:
            raise ArtifactError(f"corrupt activation file {path}: {exc}") from None
    if acts.ndim != 4:
        raise ArtifactError(f"{path}: expected a 4-d tensor [prompts, layers, positions, d_model], got {tuple(acts.shape)}")
    return acts


def split_items(paths: Paths, split: str) -> list:
    """One split of the items `collect` resolved (in stored-row order), after the leakage guard: a prompt
    in both splits raises LeakageError (exit 4), so selection never sees an eval prompt and vice versa."""
    from .evalset import check_leakage, read_items_jsonl

    items = read_items_jsonl(paths.collect_dir / "items.jsonl")
    check_leakage(items)
    out = [it for it in items if it.split == split]
    if not out:
        raise ArtifactError(f"the collected items hold no {split}-split prompts; rerun `dvc repro collect`")
    return out
