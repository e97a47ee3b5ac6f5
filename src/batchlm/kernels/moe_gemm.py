"""A grouped GEMM for mixture-of-experts layers: one launch multiplies every expert's rows by that
expert's weight matrix.

The rows arrive sorted by expert and padded to whole blocks (`layers/moe_routing.align_to_blocks`),
so each program's block of rows belongs to one expert and reads one [N, K] slice of the stacked
weights. Rows are gathered from the activations and scattered to the output through the slot ids,
so neither side is ever permuted in memory. Padding rows and blocks past the last expert's run are
masked off or skipped. K (the hidden or the intermediate size) is a compile-time constant: a model
compiles two variants per block size (it also keeps the interpreter off runtime loop bounds).

The weights are the model's dtype, MXFP4 (`Mxfp4Stack`: gpt-oss's experts as released, a quarter
of bf16's bytes), FP8 (`Fp8Stack`: e4m3 with a scale per expert row, half of bf16's bytes) or 4-bit
groups (`Int4Stack`: GPTQ, AWQ and compressed-tensors experts, a scale and a zero point per group). An
MXFP4 tile is widened in registers to exact values of the activations' dtype before the dot: an e2m1
code placed in a float's exponent and mantissa bits, a scale byte in an exponent, so no table lookup
and no rounding. An FP8 tile is widened to float32, times its rows' scales, and rounded to the
activations' dtype: the values dequantizing the stack gives. GPUs before Ada have no e4m3
conversion: there the bytes are read as integers and placed in a float's bits, as MXFP4's codes are.
A 4-bit step is one group: a code placed in a float's mantissa under the exponent of 2^23 gives
2^23 + code, less 2^23 + zero exactly, times the group's scale in float32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
import triton
import triton.language as tl

from batchlm.kernels.fp8_stack import Fp8Stack
from batchlm.kernels.int4_stack import Int4Stack
from batchlm.kernels.mxfp4_layout import Mxfp4Stack

if TYPE_CHECKING:  # the layer above hands the blocks down; kernels import no layer at run time
    from batchlm.layers.moe_routing import ExpertBlocks


@triton.jit
def _e2m1_values(codes):
    """The e2m1 values of 4-bit codes (int32) as float32: the code's exponent and mantissa bits put
    in a float's lowest exponent bits and top mantissa bit give the value times 2^-126 (code 1, the
    one subnormal, lands on a subnormal float), and its sign bit in the float's sign."""
    bits = ((codes & 7) << 22) | ((codes & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * 2.0**126


@triton.jit
def _e4m3_values(codes):
    """The e4m3 values of bytes (int32) as float32, with no e4m3 instruction: the code's exponent and
    mantissa bits put in a float's lowest exponent bits and top mantissa bits give the value times
    2^-120 (a subnormal code lands on a subnormal float), its sign bit in the float's sign."""
    bits = ((codes & 0x7F) << 20) | ((codes & 0x80) << 24)
    return bits.to(tl.float32, bitcast=True) * 2.0**120


@triton.jit
def _e8m0_scales(exponents):
    """2^(e - 127) for exponent bytes e (int32) as float32: e in a float's exponent field (e = 0, a
    subnormal, by its mantissa bit)."""
    return tl.where(exponents == 0, 1 << 22, exponents << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_tile(codes, exponents, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] float32 weights of uint8 code bytes [BLOCK_N, BLOCK_K / 2] and their groups'
    scale bytes [BLOCK_N, BLOCK_K / 32]: input 2j from byte j's low nibble, 2j + 1 from its high one."""
    codes = codes.to(tl.int32)
    values = tl.join(_e2m1_values(codes & 15), _e2m1_values(codes >> 4))  # [BLOCK_N, BLOCK_K / 2, 2]
    groups = tl.reshape(values, (BLOCK_N, BLOCK_K // 32, 32))
    scales = _e8m0_scales(exponents.to(tl.int32))
    return tl.reshape(groups * scales[:, :, None], (BLOCK_N, BLOCK_K))


# The slot count changes every step: not specializing on it (Triton would on `% 16 == 0`) keeps one
# compiled variant per block size.
@triton.jit(do_not_specialize=["num_slots"])
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,  # [E, N, K] weights (FP8: float8_e4m3fn), or with MXFP4 uint8 [E, N, K / 2] codes
    b_scales_ptr,  # MXFP4: uint8 [E, N, K / 32] scale bytes; FP8: float32 [E, N] row scales; INT4: [E, N, K / g]
    b_zeros_ptr,  # INT4: uint8 [E, N, K / g] zero points, laid out as the scales
    c_ptr,
    slot_weights_ptr,
    sorted_slots_ptr,
    block_experts_ptr,
    padded_rows_ptr,
    N,
    num_slots,
    a_row_divisor,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_se,
    stride_sn,
    stride_cm,
    stride_cn,
    K: tl.constexpr,
    MUL_SLOT_WEIGHTS: tl.constexpr,
    MXFP4: tl.constexpr,
    FP8: tl.constexpr,
    FP8_BITS: tl.constexpr,  # FP8 weights arrive as uint8 and are widened by bit placement
    INT4: tl.constexpr,  # with BLOCK_K the group size: a step is one group
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    block_m = pid // num_n_blocks
    block_n = pid % num_n_blocks
    if block_m * BLOCK_M >= tl.load(padded_rows_ptr):
        return
    expert = tl.load(block_experts_ptr + block_m).to(tl.int64)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    valid = slots < num_slots
    # The first projection reads token slot // top_k; the second reads its own slot's row.
    a_rows = slots // a_row_divisor
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MXFP4:
        # K is whole groups and BLOCK_K a multiple of one: a tile's bytes are all in or all out.
        half = tl.arange(0, BLOCK_K // 2)
        groups = tl.arange(0, BLOCK_K // 32)
        code_ptrs = b_ptr + expert * stride_be + cols[:, None] * stride_bn + half[None, :]
        scale_ptrs = b_scales_ptr + expert * stride_se + cols[:, None] * stride_sn + groups[None, :]
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            codes = tl.load(code_ptrs, mask=col_ok[:, None] & (half < (K - k0) // 2)[None, :], other=0)
            exponents = tl.load(
                scale_ptrs, mask=col_ok[:, None] & (groups < (K - k0) // 32)[None, :], other=0
            )
            w = _mxfp4_tile(codes, exponents, BLOCK_N, BLOCK_K).to(a.dtype)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            code_ptrs += BLOCK_K // 2
            scale_ptrs += BLOCK_K // 32
    elif INT4:
        half = tl.arange(0, BLOCK_K // 2)
        code_ptrs = b_ptr + expert * stride_be + cols[:, None] * stride_bn + half[None, :]
        group_ptrs = expert * stride_se + cols * stride_sn
        for _ in range(0, K, BLOCK_K):  # K is whole groups
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            codes = tl.load(code_ptrs, mask=col_ok[:, None], other=0).to(tl.int32)
            scale = tl.load(b_scales_ptr + group_ptrs, mask=col_ok, other=0.0).to(tl.float32)
            zero = tl.load(b_zeros_ptr + group_ptrs, mask=col_ok, other=0).to(tl.float32)
            nibbles = tl.reshape(tl.join(codes & 15, codes >> 4), (BLOCK_N, BLOCK_K))
            shifted = (nibbles | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + code, exact
            w = ((shifted - (8388608.0 + zero[:, None])) * scale[:, None]).to(a.dtype)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            code_ptrs += BLOCK_K // 2
            group_ptrs += 1
    elif FP8:
        # [BLOCK_N, BLOCK_K] tiles, rows along K as stored, as MXFP4's: the bytes come in by
        # asynchronous copies and are widened where they land.
        w_ptrs = b_ptr + expert * stride_be + cols[:, None] * stride_bn + ks[None, :] * stride_bk
        row_scales = tl.load(b_scales_ptr + expert * stride_se + cols * stride_sn, mask=col_ok, other=0.0)
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            w = _e4m3_values(w.to(tl.int32)) if FP8_BITS else w.to(tl.float32)
            w = (w * row_scales[:, None]).to(a.dtype)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_bk
    else:
        b_ptrs = b_ptr + expert * stride_be + cols[None, :] * stride_bn + ks[:, None] * stride_bk
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    if MUL_SLOT_WEIGHTS:
        acc = acc * tl.load(slot_weights_ptr + slots, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


# The first GPUs with e4m3 conversion instructions (Ada, compute capability 8.9).
E4M3_CAPABILITY = (8, 9)


@functools.cache
def _has_e4m3(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= E4M3_CAPABILITY


@dataclass(frozen=True)
class GroupedTile:
    """A launch shape of the grouped GEMM: output features and inputs a program step, warps, stages."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# How a stack holds its weights, for the launch shape: in the activations' dtype, FP8 (a byte a
# weight), or packed four-bit codes (MXFP4, 4-bit groups: half a byte).
StackForm = Literal["dense", "fp8", "packed"]


# FP8 stacks' 64-row blocks take 128 x 128 tiles up to this many rows an expert on average: with
# few blocks an expert the weights' bytes still bound the step, and wider K steps read them faster.
FP8_WIDE_K_ROWS_PER_EXPERT = 48.0


def tile_for(n: int, block_m: int, form: StackForm, rows_per_expert: float) -> GroupedTile:
    """The launch shape for N output features, `block_m` rows a block (`rows_per_expert` on
    average), weights held as `form`. Decode
    blocks (up to 32 rows: a step's few experts, a few rows each) take narrower N tiles than prefill's
    128, so that the few experts make enough programs: 64 columns, FP8's 32 at 16-row blocks (a column
    holds half the bytes); dense and FP8 ones also wider K steps, fewer of them. FP8's 32-row blocks
    (the busier steps, where the activations' share of the reads grows) take 128 x 128, as do its
    64-row blocks while each expert gets few of them, the bytes still bounding the step (swept on
    gpt-oss's MXFP4 experts and on Qwen3-MoE's, Qwen2-MoE's and Mixtral's, BENCHMARKS.md). Every shape
    fits the 99 KB of shared memory a block gets on Ampere and Ada workstation GPUs."""
    if n <= 64:
        return GroupedTile(64, 32)
    if form == "packed" and block_m <= 16:
        return GroupedTile(64, 128)
    if form == "packed" and block_m <= 32:
        return GroupedTile(64, 64)
    if form == "fp8" and block_m <= 16:
        return GroupedTile(32, 256, num_stages=4)
    if form == "fp8" and block_m <= 32:
        return GroupedTile(128, 128)
    if form == "dense" and block_m <= 32:
        return GroupedTile(64, 128)
    if form == "fp8" and rows_per_expert <= FP8_WIDE_K_ROWS_PER_EXPERT:
        return GroupedTile(128, 128)
    return GroupedTile(128, 64)


def stack_form(weights: torch.Tensor | Mxfp4Stack | Fp8Stack | Int4Stack) -> StackForm:
    """The form `tile_for` reads of a stack."""
    if isinstance(weights, Mxfp4Stack | Int4Stack):
        return "packed"
    return "fp8" if isinstance(weights, Fp8Stack) else "dense"


def grouped_gemm(
    a: torch.Tensor,
    weights: torch.Tensor | Mxfp4Stack | Fp8Stack | Int4Stack,
    blocks: ExpertBlocks,
    a_row_divisor: int,
    slot_weights: torch.Tensor | None = None,
    fp8_bits: bool | None = None,
) -> torch.Tensor:
    """c[s] = a[s // a_row_divisor] @ weights[expert(s)]^T for every slot s (times slot_weights[s]).
    `fp8_bits`: widen FP8 weights by bit placement (None: where the GPU has no e4m3 conversion).

    a: [rows, K]; weights: [E, N, K] stacked per expert (in a's dtype, FP8, or MXFP4 or 4-bit groups
    with K whole groups); returns c: [num_slots, N] in a's dtype.
    """
    _, n, k = weights.shape
    c = torch.empty((blocks.num_slots, n), dtype=a.dtype, device=a.device)
    if blocks.num_slots == 0:
        return c
    tile = tile_for(n, blocks.block_m, stack_form(weights), blocks.num_slots / weights.shape[0])
    zeros = a
    if isinstance(weights, Int4Stack):  # a step a group
        tile = replace(tile, block_k=weights.group_size)
        zeros = weights.zeros
    grid = (blocks.block_experts.numel() * triton.cdiv(n, tile.block_n),)
    scale = slot_weights if slot_weights is not None else a
    if isinstance(weights, Mxfp4Stack | Int4Stack):
        b, b_scales = weights.codes, weights.scales
        b_strides = (b.stride(0), b.stride(1), 1, b_scales.stride(0), b_scales.stride(1))
    elif isinstance(weights, Fp8Stack):
        if fp8_bits is None:
            fp8_bits = a.is_cuda and not _has_e4m3(a.device.index or 0)
        b, b_scales = (weights.values.view(torch.uint8) if fp8_bits else weights.values), weights.scales
        b_strides = (b.stride(0), b.stride(1), b.stride(2), b_scales.stride(0), b_scales.stride(1))
    else:
        b = b_scales = weights
        b_strides = (b.stride(0), b.stride(1), b.stride(2), 0, 0)
    _grouped_gemm_kernel[grid](
        a, b, b_scales, zeros, c, scale, blocks.sorted_slots, blocks.block_experts, blocks.padded_rows,
        n, blocks.num_slots, a_row_divisor, a.stride(0), a.stride(1), *b_strides, c.stride(0), c.stride(1),
        K=k, MUL_SLOT_WEIGHTS=slot_weights is not None, MXFP4=isinstance(weights, Mxfp4Stack),
        FP8=isinstance(weights, Fp8Stack), FP8_BITS=bool(fp8_bits), INT4=isinstance(weights, Int4Stack),
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", BLOCK_M=blocks.block_m,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return c


# Rows per block by the average rows per expert: (largest average, block rows); above the last, 64.
# A block reads its expert's whole weight matrix, so in memory-bound decode steps one block should
# hold every row an expert gets (with B tokens routed uniformly, counts spread about +-sqrt(average)).
BLOCK_M_STEPS = ((4.0, 16), (16.0, 32))
LARGEST_BLOCK_M = 64


def block_m_for(num_slots: int, num_experts: int) -> int:
    """Rows per block: small blocks when each expert gets few rows (decode), larger for prefill."""
    per_expert = num_slots / max(num_experts, 1)
    for limit, block_m in BLOCK_M_STEPS:
        if per_expert <= limit:
            return block_m
    return LARGEST_BLOCK_M


def rows_per_expert_of_each_launch(form: StackForm) -> list[float]:
    """One average rows-per-expert value that picks each block size and launch shape of a `form`
    stack (what a warm-up must run)."""
    steps = [limit for limit, _ in BLOCK_M_STEPS]
    largest_blocks = 2 * steps[-1]  # FP8's narrower K steps past FP8_WIDE_K_ROWS_PER_EXPERT too
    extra = [2 * FP8_WIDE_K_ROWS_PER_EXPERT] if form == "fp8" else []
    return [*steps, largest_blocks, *extra]
