"""Tell someone once: POST the report as JSON to a URL when the reopen condition is met."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def post(url: str, report: dict[str, Any], timeout_s: float) -> str | None:
    """POST the report; returns None on a 2xx answer, else what went wrong (the next poll tries again)."""
    data = json.dumps(report, sort_keys=True).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
