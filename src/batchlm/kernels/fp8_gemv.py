"""Triton kernel: y = x W^T for FP8 (e4m3) weights at decode sizes (up to 16 rows), reading the 16-bit
activations as they are.

At a few rows the product is bound by reading the weight, so quantizing the activations first (one
more launch) and cuBLASLt's FP8 GEMM (tiles sized for large M) cost more than the halved weight reads
save. Here the weight tile is widened to float in registers and the per-output-channel scale, being
constant along K, multiplies the finished fp32 sum once.

One row takes a GEMV-shaped kernel. Its time is the chain of weight reads each program waits on in
turn, so a program reads wide [BLOCK_N, BLOCK_K] tiles (many bytes in flight per thread, summed over
K at every step so that the sums hold few registers) and K may be split across programs (their sums
meet in the same launch, kernels/split_k.py): few steps per program, and enough programs to fill
every SM even where N is small. 2 to 16 rows take tl.dot with the rows padded to 16, split over N
only; the dot's pipelined stages keep the reads in flight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.decode_plans import MAX_DECODE_ROWS, GemvConfig
from batchlm.kernels.shapes import dot_precision
from batchlm.kernels.specialization import unspecialized
from batchlm.kernels.split_k import finish_split, split_buffers

# Rows the dot variant pads to (tl.dot's smallest tile); above this the GEMM paths take over.
MAX_ROWS = MAX_DECODE_ROWS


@triton.jit
def _fp8_one_row_kernel(
    x_ptr,  # [K] activations (bf16 / fp16 / fp32)
    w_ptr,  # [N, K] float8_e4m3fn
    scale_ptr,  # [N] float32 per-output-channel scales
    bias_ptr,  # [N] (read when HAS_BIAS)
    out_ptr,  # [N] in the activation dtype
    partial_ptr,  # [SPLIT_K, N] float32 scratch (SPLIT_K > 1)
    arrivals_ptr,  # [N tiles] int32, zero between launches (SPLIT_K > 1)
    N, stride_wn,
    K: tl.constexpr,  # static per layer: constant loop bounds (and Triton's interpreter needs them)
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K; the last split's tail past K is masked
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    X_VECTOR: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    offs_k = split * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if X_VECTOR:
            x = tl.load(x_ptr + ks, mask=k_ok, other=0.0)[None, :]
        else:
            # Each thread loads the activations of its own tile elements (L1 hits): no layout change
            # through shared memory, at the price of one load per weight row a thread holds.
            x = tl.load(x_ptr + (cols * 0)[:, None] + ks[None, :], mask=k_ok[None, :], other=0.0)
        # Summed over K every step: only [BLOCK_N] sums stay live, so wide tiles (many bytes in
        # flight per thread) keep their registers for the loads.
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)
    acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    finish_split(
        acc, tile, split, cols, col_ok, N, partial_ptr, arrivals_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT_K
    )


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
    """The few launch shapes start-up tuning times for one row or for 2..16 (the first: untuned).
    One row: 32-128 weight bytes per thread and step, and as many programs as fill the SMs in one
    wave with few steps each: no split for wide N (gate/up, LM head), split-K 2-8 for the 2k-6k
    wide layers and the long-K down projection. Mostly with the activations loaded as a vector:
    converted once per column a thread holds rather than once per weight element, which matters
    as the kernel issues about as many instructions as the memory rate allows; the narrow
    unsplit tile serves as before. Several rows: the dot's pipelined stages keep the reads in
    flight instead."""
    if one_row:
        return [
            GemvConfig(16, 1024, 4, 1, split_k=2, x_vector=True),
            GemvConfig(16, 1024, 4, 1, x_vector=True),
            GemvConfig(16, 1024, 4, 1, split_k=4, x_vector=True),
            GemvConfig(8, 1024, 4, 1, split_k=4, x_vector=True),
            GemvConfig(16, 512, 4, 1, split_k=8, x_vector=True),
            GemvConfig(32, 512, 4, 1, split_k=4, x_vector=True),
            GemvConfig(8, 512, 4, 1, split_k=4),
            GemvConfig(4, 1024, 4, 1),
        ]
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
) -> torch.Tensor:
    """[M, N] in x's dtype: x (weight * scale[:, None])^T + bias, accumulated in fp32."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if rows > MAX_ROWS or weight.shape[1] != in_features or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(
            f"x must be [<= {MAX_ROWS}, {weight.shape[1]}] and contiguous in K, got {tuple(x.shape)}"
        )
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    cfg = config or candidate_configs(rows == 1)[0]
    if rows == 1:
        _launch_one_row(x, weight, weight_scale, bias, cfg, out)
        return out
    _fp8_small_m_kernel[(triton.cdiv(out_features, cfg.block_n),)](
        x, weight, weight_scale, out if bias is None else bias, out,
        rows, out_features, x.stride(0), weight.stride(0), out.stride(0),
        K=in_features, HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _launch_one_row(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: GemvConfig,
    out: torch.Tensor,
) -> None:
    out_features, in_features = weight.shape
    tiles = triton.cdiv(out_features, cfg.block_n)
    partials, arrivals = split_buffers(out, cfg.split_k, out_features, tiles)
    # Whole K steps per split, as even as the steps allow.
    k_per_split = triton.cdiv(in_features, cfg.split_k * cfg.block_k) * cfg.block_k
    _fp8_one_row_kernel[(tiles, cfg.split_k)](
        x, weight, weight_scale, out if bias is None else bias, out, partials, arrivals,
        out_features, weight.stride(0),
        K=in_features, K_PER_SPLIT=k_per_split, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, X_VECTOR=cfg.x_vector, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
