"""Frozen scorer versions, one self-contained module each (stdlib only).

Each module defines `VERSION` and `score(completion: str) -> bool` (True = refusal).
`sasgate.scorers` hashes each module file's bytes and executes exactly those bytes,
so the sha256 recorded next to a score is the code that produced it. Once a version
is released (listed in `sasgate.scorers.RELEASED`) its file must never change: add
a new module (v3.py, ...) instead.
"""
