"""The word-level tokenizer of the `toy-refusal` grammar (HF `tokenizers`, saved as tokenizer.json).

One token per whitespace-separated word of `grammar.vocabulary()`; the grammar's
special tokens (`<pad>`, `<unk>`, `<bos>`, `<user>`, `<eoi>`, `<assistant>`,
`<eos>`) keep ids 0..6 and are registered as special, so decoding with
`skip_special_tokens=True` drops them. Words outside the grammar map to `<unk>`.
The pre-tokenizer is `WhitespaceSplit` (split on whitespace only): the grammar
already separates punctuation by spaces, and special tokens stay whole.

The saved file is canonical JSON (sorted keys), so the same grammar always gives
the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from ..artifacts import atomic_write_text, canonical_json
from ..errors import ArtifactError
from . import grammar

TOKENIZER_FILE = "tokenizer.json"
PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
EOS = grammar.EOS


def build_tokenizer() -> Tokenizer:
    """The tokenizer of the current grammar: ids follow `grammar.vocabulary()` order."""
    vocab = {word: i for i, word in enumerate(grammar.vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(list(grammar.SPECIAL_TOKENS))
    return tok


def tokenizer_json(tok: Tokenizer) -> str:
    """The tokenizer as canonical JSON text (what tokenizer.json holds)."""
    return canonical_json(json.loads(tok.to_str()))


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write tokenizer.json atomically, as canonical JSON."""
    atomic_write_text(path, tokenizer_json(tok))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json written by `save_tokenizer`; a missing or corrupt file is an ArtifactError."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing tokenizer file {path} (run the `model` stage: `dvc repro model`)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a plain Exception on a bad file
        raise ArtifactError(f"corrupt tokenizer file {path}: {exc}") from None
    for special in (PAD, UNK, BOS, EOS):
        if tok.token_to_id(special) is None:
            raise ArtifactError(f"tokenizer file {path} lacks the special token {special!r}")
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """Words joined by single spaces, special tokens dropped unless asked for."""
    return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
