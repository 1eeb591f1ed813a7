"""Text from a bundle, made safe to print on a terminal.

A bundle is untrusted until it verifies, and even a verified one carries strings its signer
chose. Printed raw, a newline or an ANSI escape in a claim text, a signer name or a member name
could draw a fake "VERIFIED ... signed by" block or erase a warning, and bidi controls could
reorder what a reader sees. `safe` escapes every character `str.isprintable` rejects: C0 and C1
controls (newline, carriage return, ESC), DEL, bidi and other format characters, line and
paragraph separators, surrogates, private-use and unassigned code points.
"""

from __future__ import annotations


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    o = ord(c)
    return _NAMED.get(c) or (f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")


def safe(value: object) -> str:
    """str(value) on one line, every non-printable character written as a Python-style escape."""
    text = value if isinstance(value, str) else str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else _escape(c) for c in text)


def safe_lines(text: str) -> str:
    """Like `safe`, but the newlines of a multi-line message of our own are kept."""
    return "\n".join(safe(line) for line in text.split("\n"))
