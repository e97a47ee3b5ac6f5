"""Triton W4A16 GEMM: x [M, K] (bf16/fp16) times a 4-bit weight (kernels/int4_pack.py layout).

The weight tile is dequantized in registers, (code - zero) * scale, and fed to tl.dot in the
activation dtype; only packed words, one scale and one zero row per group ever leave memory. A
K tile never spans two groups (BLOCK_K divides the group size), so each tile reads one [BLOCK_N]
row of scales and zeros. Decode shapes (few rows) split K across programs (split-K) so that a
GEMV-sized problem still fills the GPU; the fp32 partial sums are added by one torch reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from batchlm.kernels.int4_pack import CODES_PER_WORD, PackedInt4
from batchlm.kernels.shapes import sm_count
from batchlm.kernels.specialization import unspecialized


@dataclass(frozen=True)
class W4A16Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@triton.jit(**unspecialized(ints=["M"]))
def _w4a16_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [K / 8, N] int32
    scales_ptr,  # [K / g, N]
    zeros_ptr,  # [K / g, N]
    out_ptr,  # [SPLIT_K, M, N]: the model dtype when SPLIT_K == 1, else fp32 partial sums
    M, N, K, stride_xm,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,  # K columns per split, a multiple of BLOCK_K (static per layer)
    PRECISION: tl.constexpr,  # "ieee" for float32 activations: TF32 would round them to 10 bits
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    # The last split's tail past K (when SPLIT_K does not divide the K tiles) is masked.
    k_start = split * K_PER_SPLIT
    offs_k = tl.arange(0, BLOCK_K)
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + step
        ks = k0 + offs_k
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        word_rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(
            qweight_ptr + word_rows.to(tl.int64)[:, None] * N + cols[None, :],
            mask=(word_rows < K // 8)[:, None] & col_ok[None, :],
            other=0,
        )  # [BLOCK_K / 8, BLOCK_N]: each word loaded once, then its 8 codes spread over 8 rows
        codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
        group = (k0 // GROUP_SIZE).to(tl.int64)
        group_ok = col_ok & (k0 < K)
        scale = tl.load(scales_ptr + group * N + cols, mask=group_ok, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * N + cols, mask=group_ok, other=0.0).to(tl.float32)
        w = ((codes.to(tl.float32) - zero[None, :]) * scale[None, :]).to(x.dtype)
        acc += tl.dot(x, w, input_precision=PRECISION)
    out = out_ptr + split.to(tl.int64) * M * N + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def choose_config(rows: int, packed: PackedInt4, num_sms: int) -> W4A16Config:
    """Decode (up to 16 rows): narrow N tiles and split-K until about two programs per SM.
    Prefill: 64 x 128 tiles, no split."""
    block_k = min(128 if rows <= 16 else 64, packed.group_size)
    if rows <= 16:
        block_n = 64
        tiles = triton.cdiv(packed.out_features, block_n)
        k_tiles = packed.in_features // block_k
        wanted = max(1, min(k_tiles, triton.cdiv(2 * num_sms, tiles), 16))
        # A split count that divides the K tiles leaves no split with masked-off iterations.
        split_k = max(s for s in range(1, wanted + 1) if k_tiles % s == 0)
        return W4A16Config(16, block_n, block_k, split_k, num_warps=4, num_stages=4)
    block_m = 64 if rows > 32 else 32
    return W4A16Config(block_m, 128, block_k, 1, num_warps=4, num_stages=3)


def w4a16_matmul(x: torch.Tensor, packed: PackedInt4, config: W4A16Config | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype."""
    rows, in_features = x.shape
    out_features = packed.out_features
    if in_features != packed.in_features or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, {packed.in_features}] and contiguous in K, got {tuple(x.shape)}")
    cfg = config or choose_config(rows, packed, sm_count(x.device))
    if packed.group_size % cfg.block_k or cfg.block_k % CODES_PER_WORD:
        raise ValueError(f"block_k {cfg.block_k} must divide the group size {packed.group_size}")
    if rows == 0:
        return x.new_empty((0, out_features))
    out_dtype = x.dtype if cfg.split_k == 1 else torch.float32
    out = torch.empty((cfg.split_k, rows, out_features), dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(rows, cfg.block_m) * triton.cdiv(out_features, cfg.block_n), cfg.split_k)
    _w4a16_kernel[grid](
        x, packed.qweight, packed.scales, packed.zeros, out,
        rows, out_features, in_features, x.stride(0),
        GROUP_SIZE=packed.group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, K_PER_SPLIT=triton.cdiv(in_features // cfg.block_k, cfg.split_k) * cfg.block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out[0] if cfg.split_k == 1 else out.sum(dim=0).to(x.dtype)
