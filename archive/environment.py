"""The machine and software a bundle was exported on.

Goes into the bundle only (`_sasgate/environment.json`), never into a DVC output: it
describes where the result came from without making any artifact depend on the host.
No host name, user name, path or time: the same machine gives the same record, so
exporting twice stays byte-identical.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

ENV_SCHEMA = "sasgate.environment/1"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _os_release() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def _torch() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "hip_build": getattr(torch.version, "hip", None),
        "git_version": getattr(torch.version, "git_version", None),
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }


def packages() -> dict[str, str]:
    """Every installed distribution and its version, sorted by normalized name."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out[name.lower().replace("_", "-")] = dist.version
    return dict(sorted(out.items()))


def describe() -> dict[str, Any]:
    """Python, packages, torch build, CPU/GPU model and OS of this machine."""
    return {
        "schema": ENV_SCHEMA,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "compiler": platform.python_compiler()},
        "os": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
               "distribution": _os_release(), "libc": " ".join(platform.libc_ver()).strip() or None},
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count()},
        "torch": _torch(),
        "packages": packages(),
        "executable_prefix_is_venv": sys.prefix != sys.base_prefix,
    }
