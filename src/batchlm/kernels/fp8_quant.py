"""Triton kernel: per-token FP8 (e4m3) quantization of activations in one launch.

Each program owns one row: a first pass finds the row's largest magnitude (skipped for a static
scale), a second writes the scaled, clamped codes and the row's scale. One launch instead of the
half-dozen elementwise torch ops the same arithmetic takes, which counts at decode sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.fp8_types import FP8_DTYPE, FP8_MAX
from batchlm.kernels.shapes import next_power_of_2

# Columns per inner-loop tile (rows longer than this take several).
MAX_BLOCK = 4096


@triton.jit
def _per_token_fp8_kernel(
    x_ptr,  # [M, K]
    codes_ptr,  # [M, K] float8_e4m3fn
    scale_ptr,  # [M] float32 out
    static_scale_ptr,  # [1] float32 (read when STATIC)
    stride_x,
    stride_codes,
    K: tl.constexpr,  # row length (static per layer, so the loops have constant bounds)
    STATIC: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8_LIMIT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(static_scale_ptr)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            x = tl.load(x_ptr + row * stride_x + start + cols, mask=start + cols < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = tl.maximum(tl.max(amax, 0), 1e-12) / FP8_LIMIT
    tl.store(scale_ptr + row, scale)
    inverse = 1.0 / scale
    for start in range(0, K, BLOCK):
        mask = start + cols < K
        x = tl.load(x_ptr + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        code = tl.minimum(tl.maximum(x * inverse, -FP8_LIMIT), FP8_LIMIT)
        tl.store(
            codes_ptr + row * stride_codes + start + cols, code.to(codes_ptr.dtype.element_ty), mask=mask
        )


def per_token_fp8(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes [M, K] float8_e4m3fn, scales [M, 1] float32) with x ~ codes * scales.
    Dynamic: each row's amax maps to 448. Static: every row uses `static_scale` ([1] float32)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] and contiguous in K, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    codes = torch.empty((rows, cols), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return codes, scales
    _per_token_fp8_kernel[(rows,)](
        x, codes, scales, scales if static_scale is None else static_scale,
        x.stride(0), codes.stride(0),
        K=cols,
        STATIC=static_scale is not None,
        BLOCK=min(MAX_BLOCK, next_power_of_2(cols)),
        FP8_LIMIT=FP8_MAX,
        num_warps=4,
    )  # fmt: skip
    return codes, scales
