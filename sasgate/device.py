"""Which device a stage computes on: params `runtime.device`, overridden by `--device` or the
SASGATE_DEVICE environment variable, so the same pipeline moves to a GPU machine without an
edit to params.yaml; refused up front (exit 2) when this machine does not have it.

The override is not a DVC param: DVC does not rerun a stage because it changed. Outputs
record what they were computed with (`compute_record`) and the run log keeps it per run.
"""

from __future__ import annotations

import os
from typing import get_args

from .errors import ParamsError
from .params import Params, RuntimeParams

DEVICE_ENV = "SASGATE_DEVICE"
DEVICES: tuple[str, ...] = get_args(RuntimeParams.model_fields["device"].annotation)


def available(device: str) -> bool:
    import torch

    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return torch.backends.mps.is_available()
    return device == "cpu"


def with_device(params: Params, override: str | None = None) -> Params:
    """params with runtime.device from `override`, else $SASGATE_DEVICE, else params; checked here."""
    env = os.environ.get(DEVICE_ENV) or None
    device, origin = ((override, "--device") if override else (env, f"${DEVICE_ENV}") if env
                      else (params.runtime.device, "params runtime.device"))
    if device not in DEVICES:
        raise ParamsError(f"{origin} = {device!r} is not a device sasgate runs on; choose one of {list(DEVICES)}")
    if not available(device):
        raise ParamsError(f"{origin} = {device!r}, but this machine has no {device} device available to torch")
    if device == params.runtime.device:
        return params
    return params.model_copy(update={"runtime": params.runtime.model_copy(update={"device": device})})


def compute_record(params: Params) -> dict[str, str]:
    """What a stage's numbers were computed with: device and model dtype."""
    return {"device": params.runtime.device, "dtype": params.model.dtype}
