"""Triton kernel: y = x W^T for one row of 16-bit activations, the weight 16-bit (dense) or FP8 (e4m3,
with one scale per output channel): the decode step of a single sequence.

One row is bound by reading the weight, and its time is the chain of weight reads each program
waits on in turn. So a program reads wide [BLOCK_N, BLOCK_K] tiles (many bytes in flight per thread,
summed over K at every step so that the sums hold few registers, or with `late_sum` kept per
thread and summed across threads once, after the loop), and K may be split across
programs (their sums meet in the same launch, kernels/split_k.py): few steps per program, and
enough programs to fill every SM even where N is small. An FP8 tile is widened to float in
registers; its scale, constant along K, multiplies the finished sum once.

With programmatic dependent launch (kernels/pdl.py) a program reads its first weight tile before
waiting for the kernel that wrote x, so the first reads overlap that kernel's end.

A gated MLP's down projection may take [gate | up] and make silu(gate) * up as it loads it: the
SiLU-and-mul launch between the two GEMVs, a wait on the one before at one row, goes away.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from batchlm.kernels.decode_plans import GemvConfig
from batchlm.kernels.fused_ops import silu_times
from batchlm.kernels.pdl import let_next_kernel_start, pdl_launch, wait_for_previous_kernel
from batchlm.kernels.split_k import finish_split, split_buffers


@triton.jit
def _activations(x_ptr, at, ok, K: tl.constexpr, GATED: tl.constexpr):
    """x[at], or with GATED (x_ptr is [gate | up], 2K long) silu(gate[at]) * up[at]."""
    if GATED:
        return silu_times(
            tl.load(x_ptr + at, mask=ok, other=0.0), tl.load(x_ptr + K + at, mask=ok, other=0.0)
        )
    return tl.load(x_ptr + at, mask=ok, other=0.0)


@triton.jit
def _x_operand(x_ptr, ks, k_ok, cols, K: tl.constexpr, X_VECTOR: tl.constexpr, GATED: tl.constexpr):
    """The activations x[ks] for a [BLOCK_N, BLOCK_K] weight tile: [BLOCK_K] with X_VECTOR, else
    [BLOCK_N, BLOCK_K]."""
    if X_VECTOR:
        x = _activations(x_ptr, ks, k_ok, K, GATED)
    else:
        # Each thread loads the activations of its own tile elements (L1 hits): no layout change
        # through shared memory, at the price of one load per weight row a thread holds.
        x = _activations(x_ptr, (cols * 0)[:, None] + ks[None, :], k_ok[None, :], K, GATED)
    return x


@triton.jit
def _products(w, x, X_VECTOR: tl.constexpr):
    """[BLOCK_N, BLOCK_K] fp32: the weight tile times the activations of `_x_operand`."""
    if X_VECTOR:
        x = x[None, :]
    return w.to(tl.float32) * x.to(tl.float32)


@triton.jit
def _one_row_kernel(
    x_ptr,  # [K] activations (bf16 / fp16 / fp32); with GATED [2K], gate then up
    w_ptr,  # [N, K] in the activations' dtype, or float8_e4m3fn
    scale_ptr,  # [N] float32 per-output-channel scales (read when HAS_SCALE)
    bias_ptr,  # [N] (read when HAS_BIAS)
    out_ptr,  # [N] in the activation dtype
    partial_ptr,  # [SPLIT_K, N] float32 scratch (SPLIT_K > 1)
    arrivals_ptr,  # [N tiles] int32, zero between launches (SPLIT_K > 1)
    N, stride_wn,
    K: tl.constexpr,  # static per layer: constant loop bounds (and Triton's interpreter needs them)
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K; the last split's tail past K is masked
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, X_VECTOR: tl.constexpr, LATE_SUM: tl.constexpr, GATED: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    let_next_kernel_start(PDL)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    offs_k = split * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    # The first step's weights: no kernel writes them, so they may be read before the wait.
    w = tl.load(w_rows + offs_k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    wait_for_previous_kernel(PDL)
    x = _x_operand(x_ptr, offs_k, k_ok, cols, K, X_VECTOR, GATED)
    if LATE_SUM:
        # Products kept per thread across steps and summed across threads once, after the loop;
        # the next step's weights and activations are read before this step's multiply.
        sums = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(BLOCK_K, K_PER_SPLIT + BLOCK_K, BLOCK_K):
            ks = k0 + offs_k
            k_ok = (ks < K) & (k0 < K_PER_SPLIT)
            next_w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            next_x = _x_operand(x_ptr, ks, k_ok, cols, K, X_VECTOR, GATED)
            sums += _products(w, x, X_VECTOR)
            w = next_w
            x = next_x
        acc = tl.sum(sums, axis=1)
    else:
        # Summed over K every step: only [BLOCK_N] sums stay live, so wide tiles (many bytes in
        # flight per thread) keep their registers for the loads.
        acc = tl.sum(_products(w, x, X_VECTOR), axis=1)
        for k0 in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < K
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            x = _x_operand(x_ptr, ks, k_ok, cols, K, X_VECTOR, GATED)
            acc += tl.sum(_products(w, x, X_VECTOR), axis=1)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    finish_split(
        acc, tile, split, cols, col_ok, N, partial_ptr, arrivals_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT_K
    )


def one_row_configs(weight_bytes: int) -> list[GemvConfig]:
    """The launch shapes start-up tuning times for one row of a weight with `weight_bytes` per
    element (the first: untuned). 32-128 weight bytes per thread and step, and as many programs as
    fill the SMs in one wave with few steps each: no split for wide N (gate/up, LM head), split-K
    2-8 for the 2k-6k wide layers and the long-K down projection. Mostly with the activations loaded
    as a vector: converted once per column a thread holds rather than once per weight element,
    which matters as the kernel issues about as many instructions as the memory rate allows; the
    narrow unsplit tile serves as before. Two unsplit shapes also come late-summed (their sums meet
    across threads once, after the loop, and each step's reads are issued a step ahead), which
    some 16-bit shapes prefer. 16-bit weights take half the K per step of FP8."""
    configs = [
        GemvConfig(16, 1024, 4, 1, split_k=2, x_vector=True),
        GemvConfig(16, 1024, 4, 1, x_vector=True),
        GemvConfig(16, 1024, 4, 1, split_k=4, x_vector=True),
        GemvConfig(8, 1024, 4, 1, split_k=4, x_vector=True),
        GemvConfig(16, 512, 4, 1, split_k=8, x_vector=True),
        GemvConfig(32, 512, 4, 1, split_k=4, x_vector=True),
        GemvConfig(8, 512, 4, 1, split_k=4),
        GemvConfig(4, 1024, 4, 1),
        GemvConfig(4, 1024, 4, 1, x_vector=True, late_sum=True),
        GemvConfig(16, 1024, 4, 1, x_vector=True, late_sum=True),
    ]
    return [replace(c, block_k=c.block_k // weight_bytes) for c in configs]


def one_row_linear(
    x: torch.Tensor,  # [1, K] contiguous in K; with `gated`, [1, 2K]: gate then up
    weight: torch.Tensor,  # [N, K] in x's dtype, or float8_e4m3fn with `scale`
    scale: torch.Tensor | None,  # [1, N] or [N] float32 per-output-channel scales
    bias: torch.Tensor | None,
    config: GemvConfig,
    out: torch.Tensor | None = None,  # [1, N] in x's dtype
    gated: bool = False,
) -> torch.Tensor:
    """[1, N]: x (weight * scale[:, None])^T + bias, accumulated in fp32. With `gated` the input is
    silu(gate) * up, made in the kernel as SiLU-and-mul makes it (one launch fewer a layer)."""
    out_features, in_features = weight.shape
    width = 2 * in_features if gated else in_features
    if x.shape != (1, width) or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"x must be [1, {width}] and contiguous, got {tuple(x.shape)}")
    if out is None:
        out = torch.empty((1, out_features), dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(out_features, config.block_n)
    partials, arrivals = split_buffers(out, config.split_k, out_features, tiles)
    # Whole K steps per split, as even as the steps allow.
    k_per_split = triton.cdiv(in_features, config.split_k * config.block_k) * config.block_k
    _one_row_kernel[(tiles, config.split_k)](
        x, weight, out if scale is None else scale, out if bias is None else bias, out, partials, arrivals,
        out_features, weight.stride(0),
        K=in_features, K_PER_SPLIT=k_per_split, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k, X_VECTOR=config.x_vector,
        LATE_SUM=config.late_sum, GATED=gated, num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(x.device),
    )  # fmt: skip
    return out
