"""`sasgate archive show BUNDLE --html OUT`: the report page of a received bundle, rendered from its records.

The bundle is read once through the archive's defensive reader (`verify.read_bundle`: every member
checked, the same size and nesting limits as `verify`), or, with `--key`, fully verified first. The
page is never the bundle's own report.html (that would show whatever markup a sender put there):
it is rendered here, by this sasgate, from the bundled records (every string escaped, no script),
with the bundle's git commit, signer and environment, under a banner that says VERIFIED only when
`verify` passed with the key given, and UNVERIFIED otherwise. It also says whether the bundle's own
report.html is byte for byte what its records render to here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sasgate.artifacts import atomic_write_text
from sasgate.errors import NotVerifiedError
from sasgate.report import OUT, BundleContext, read_records, render

from . import bundle
from .verify import Contents, read_bundle, verify


def _json(contents: Contents, name: str) -> dict[str, Any] | None:
    try:
        raw = json.loads(contents.data[name].decode("utf-8"))
    except (KeyError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def write_html(path: str | os.PathLike, out: str | os.PathLike, key: Ed25519PublicKey | None = None) -> BundleContext:
    """Render the bundle's report page to out (atomically); returns what the banner says."""
    name = Path(path).name
    if key is None:
        contents, verified, verdict = read_bundle(path), False, "not verified (no --key given)"
    else:
        try:
            v = verify(path, key)
            contents, verified = v.contents, True
            verdict = f"signed by {v.keyid} (the key given); checked: {', '.join(v.checks)}"
        except Exception as exc:  # fail closed: an unexpected error is never a pass
            why = str(exc) if isinstance(exc, NotVerifiedError) else f"internal error: {type(exc).__name__}: {exc}"
            contents, verified, verdict = read_bundle(path), False, f"NOT VERIFIED: {why}"
    records = read_records(contents.data.get)
    bundled = contents.data.get(OUT)
    plain = render(records)
    same = ("absent from the bundle" if bundled is None else
            "byte for byte the rendering of its records here" if bundled == plain.encode("utf-8") else
            "differs from the rendering of its records here (another renderer version, or edited)")
    ctx = BundleContext(name=name, verified=verified, verdict=verdict, info=_json(contents, bundle.BUNDLE_INFO),
                        environment=_json(contents, bundle.ENVIRONMENT), bundled_report=same)
    atomic_write_text(out, render(records, ctx))
    return ctx
