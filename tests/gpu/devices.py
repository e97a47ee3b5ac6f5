"""What the GPU test modules start with: the skip where no CUDA GPU runs them (or, for kernel tests,
Triton's CPU interpreter under TRITON_INTERPRET=1), and the device and 16-bit dtype they run on.
A module calls its skip at import, before it imports the kernels, so a CPU machine collects it cleanly."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter's bf16 dot is broken: its 16-bit cases run in fp16.
HALF = torch.float16 if INTERPRET else torch.bfloat16
# Attention's error against a float32 reference, in HALF.
HALF_ATOL = 4e-3 if INTERPRET else 2e-2


def require_cuda() -> None:
    """Skip the calling module without a CUDA GPU."""
    __tracebackhide__ = True  # the skip names the module's line, not this one
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)


def require_cuda_or_interpreter() -> None:
    """Skip the calling module without triton, or without both a CUDA GPU and TRITON_INTERPRET=1."""
    __tracebackhide__ = True
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not INTERPRET:
        pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1)", allow_module_level=True)
