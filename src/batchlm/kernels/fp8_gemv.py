"""Triton kernel: y = x W^T for FP8 (e4m3) weights at decode sizes (up to 16 rows), reading the 16-bit
activations as they are.

At a few rows the product is bound by reading the weight, so quantizing the activations first (one
more launch) and cuBLASLt's FP8 GEMM (tiles sized for large M) cost more than the halved weight reads
save. Here the weight tile is widened to float in registers and the per-output-channel scale, being
constant along K, multiplies the finished fp32 sum once.

One row takes the GEMV kernel dense weights share (kernels/one_row_gemv.py). 2 to 16 rows take
tl.dot with the rows padded to 16, split over N only; the dot's pipelined stages keep the reads in
flight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.decode_plans import MAX_DECODE_ROWS, GemvConfig
from batchlm.kernels.one_row_gemv import one_row_configs, one_row_linear
from batchlm.kernels.shapes import dot_precision
from batchlm.kernels.specialization import unspecialized

# Rows the dot variant pads to (tl.dot's smallest tile); above this the GEMM paths take over.
MAX_ROWS = MAX_DECODE_ROWS


@triton.jit(**unspecialized(ints=["M"]))
def _fp8_small_m_kernel(
    x_ptr,  # [M, K] activations (bf16 / fp16 / fp32)
    w_ptr,  # [N, K] float8_e4m3fn
    scale_ptr,  # [N] float32 per-output-channel scales
    bias_ptr,  # [N] (read when HAS_BIAS)
    out_ptr,  # [M, N] in the activation dtype
    M, N, stride_xm, stride_wn, stride_om,
    K: tl.constexpr,  # static per layer: constant loop bounds (and Triton's interpreter needs them)
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :],
            mask=(rows < M)[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        # e4m3 values are exact in fp16, fp32 and bf16, so the tensor cores see the true codes. The
        # steps through fp16 and fp32 are full-rate instructions; Triton's direct e4m3 -> bf16
        # goes through a quarter-rate conversion, which bounds the kernel below memory speed.
        w = w.to(tl.float16).to(tl.float32).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & col_ok[None, :])


def candidate_configs(one_row: bool) -> list[GemvConfig]:
    """The few launch shapes start-up tuning times for one row (kernels/one_row_gemv.py) or for
    2..16 (the first: untuned). Several rows: the dot's pipelined stages keep the reads in flight."""
    if one_row:
        return one_row_configs(weight_bytes=1)
    return [
        GemvConfig(32, 256, 4, 3),
        GemvConfig(16, 256, 4, 4),
        GemvConfig(32, 128, 4, 4),
        GemvConfig(64, 256, 8, 3),
    ]


def fp8_small_m(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS, contiguous in K
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [1, N] or [N] float32
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """[M, N] in x's dtype: x (weight * scale[:, None])^T + bias, accumulated in fp32. `gated` (one
    row only): x is [1, 2K], gate then up, and the input is silu(gate) * up."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if gated:
        if rows != 1:
            raise ValueError(f"a gated input is one row, got {rows}")
        return one_row_linear(x, weight, weight_scale, bias, config or candidate_configs(True)[0], gated=True)
    if rows > MAX_ROWS or weight.shape[1] != in_features or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(
            f"x must be [<= {MAX_ROWS}, {weight.shape[1]}] and contiguous in K, got {tuple(x.shape)}"
        )
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    cfg = config or candidate_configs(rows == 1)[0]
    if rows == 1:
        return one_row_linear(x, weight, weight_scale, bias, cfg, out)
    _fp8_small_m_kernel[(triton.cdiv(out_features, cfg.block_n),)](
        x, weight, weight_scale, out if bias is None else bias, out,
        rows, out_features, x.stride(0), weight.stride(0), out.stride(0),
        K=in_features, HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
