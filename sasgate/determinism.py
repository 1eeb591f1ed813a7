"""One place that makes torch deterministic, so every stage seeds the same way."""

from __future__ import annotations

import os
import random

import numpy as np


def make_deterministic(seed: int, threads: int, device: str = "cpu") -> None:
    """Seed python, numpy and torch; force deterministic kernels; fix the CPU thread count.

    The thread count is a param because CPU reductions may split differently with it.
    On CUDA, cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first call.
    """
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
