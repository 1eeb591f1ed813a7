"""The one formatter of pydantic validation errors for every record sasgate reads (gates, rows, locks, decision)."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation(exc: ValidationError) -> str:
    """pydantic's errors as one line naming each field: `unknown field 'x'`, `missing field 'y'`, `a.b: why`."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            out.append(f"unknown field {loc!r}")
        elif err["type"] == "missing":
            out.append(f"missing field {loc!r}")
        else:
            out.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(sorted(set(out)))
