"""Pick the fused Triton kernels for CUDA tensors when Triton is importable; None means use torch."""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch


@functools.cache
def _fused_ops() -> ModuleType | None:
    if os.environ.get("BATCHLM_DISABLE_FUSED_OPS"):
        return None
    try:
        from batchlm.kernels import fused_ops
    except ImportError:  # no Triton (CPU installs): the layers fall back to torch ops
        return None
    return fused_ops


def fused_ops_for(x: torch.Tensor) -> ModuleType | None:
    """The fused-kernel module for tensors on a CUDA device, else None."""
    return _fused_ops() if x.is_cuda else None
