"""Open pages in a real headless Chromium (Debian's `chromium`), offline, and read back what it drew."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# The flags the machine needs (no sandbox as root, no GPU) and none of Chromium's own traffic; every host
# name resolves to nothing, so a page that needed the network would show it.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars"]


def chromium() -> str:
    """The browser; CI (.ci/run) installs it when missing, so its absence fails rather than skips."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does this)")
    return path


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="sasgate-chromium-") as profile:
        res = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                             text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"chromium failed ({res.returncode}): {res.stderr[-2000:]}")
    return res


def dump_dom(page: Path, wait_ms: int = 20000) -> str:
    """The DOM after the page's scripts ran (virtual time lets vega's asynchronous rendering finish)."""
    return _run([f"--virtual-time-budget={wait_ms}", "--dump-dom", page.resolve().as_uri()]).stdout


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 4000, wait_ms: int = 5000) -> Path:
    _run([f"--virtual-time-budget={wait_ms}", f"--window-size={width},{height}", f"--screenshot={out}",
          page.resolve().as_uri()])
    return out
