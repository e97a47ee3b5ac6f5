"""Triton kernel: one activation row times a 4-bit weight (kernels/int4_pack.py layout), the decode
step of a single stream.

At one row the product is bound by reading the packed words, and unpacking them costs enough
instructions to matter, so a code costs one integer and one float instruction:
- a code masked in place (bits 4p..4p+3 of its word) and read as float32 bits is c * 2^(4p - 149)
  exactly: a subnormal or, for nibble 5, one of the smallest normals, whose value is still the bits
  times 2^-149. No shift, no int-to-float conversion (a slow instruction); nibbles 6-7 take one shift
  of the word. Triton keeps subnormals (it emits no flush-to-zero float ops);
- the 2^(4p - 149) is undone in that code's activation, x * 2^(85 - 4p) (exact), loaded once per word
  row, so every product is c * x * 2^-64, normal for any activation of interest, and the sum is
  scaled back once at the end;
- programs step through whole groups, so a group's scales and zero points are one [BLOCK_N] row each,
  applied once per group: s * (sum_k c_k x_k - z * sum_k x_k). Folded to one sum per column each
  group, or (`late_sum` launch shapes) applied per word row a thread holds, the sums meeting across
  threads once at the end and the scales read a group ahead, so that no step of the loop waits on
  memory at a barrier: start-up timing picks per weight shape (BENCHMARKS.md).
Programs split N (words are contiguous along N, so a [BLOCK_KW, BLOCK_N] tile reads whole rows of
BLOCK_N words) and, where N alone gives too few programs to keep enough reads in flight, K (the
splits' sums meet in the same launch, kernels/split_k.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.decode_plans import GemvConfig
from batchlm.kernels.int4_pack import CODES_PER_WORD, PackedInt4
from batchlm.kernels.pdl import let_next_kernel_start, pdl_launch, wait_for_previous_kernel
from batchlm.kernels.split_k import finish_split, split_buffers
from batchlm.kernels.w4a16_gemm import W4A16Config


@triton.jit
def _add_nibble(dot, x_sum, word, x_ptr, k, k_ok, P: tl.constexpr):
    """dot + code * x[k] * 2^-64 and x_sum + x[k], for the code in bits 4P..4P+3 of every word; k and
    k_ok are [BLOCK_KW] (one activation per word row)."""
    x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    code = (word & (0xF << (4 * P))).to(tl.float32, bitcast=True)  # code * 2^(4P - 149), exact
    return dot + code * (x * (2.0 ** (85 - 4 * P)))[:, None], x_sum + x


@triton.jit
def _word_tile(qweight_ptr, first_row, cols, col_ok, N, ROWS_END, BLOCK_KW: tl.constexpr):
    """[BLOCK_KW, BLOCK_N] packed words from word row `first_row` on (rows from ROWS_END on read as 0)."""
    word_rows = first_row + tl.arange(0, BLOCK_KW)
    row_ok = word_rows < ROWS_END
    return tl.load(
        qweight_ptr + word_rows.to(tl.int64)[:, None] * N + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0,
    )


@triton.jit
def _group_scales(scales_ptr, zeros_ptr, group, cols, col_ok, N, GROUPS_END):
    """[BLOCK_N] scales and zero points of `group` as stored (groups from GROUPS_END on read as 0)."""
    ok = col_ok & (group < GROUPS_END)
    at = group.to(tl.int64) * N + cols
    return tl.load(scales_ptr + at, mask=ok, other=0.0), tl.load(zeros_ptr + at, mask=ok, other=0.0)


@triton.jit
def _group_sums(x_ptr, qweight_ptr, words, group, cols, col_ok, N, groups_end,
                GROUPS: tl.constexpr, WORDS_PER_GROUP: tl.constexpr, BLOCK_KW: tl.constexpr):  # fmt: skip
    """One group's [BLOCK_KW, BLOCK_N] sums of codes times activations (times 2^-64) and [BLOCK_KW]
    sums of the activations, from its first word tile `words`; and the next group's first word tile."""
    dot = tl.zeros([BLOCK_KW, cols.shape[0]], dtype=tl.float32)
    x_sum = tl.zeros([BLOCK_KW], dtype=tl.float32)
    for first in range(0, WORDS_PER_GROUP, BLOCK_KW):
        word_rows = group * WORDS_PER_GROUP + first + tl.arange(0, BLOCK_KW)
        row_ok = word_rows < GROUPS * WORDS_PER_GROUP
        if first > 0:
            words = _word_tile(qweight_ptr, group * WORDS_PER_GROUP + first, cols, col_ok, N,
                               GROUPS * WORDS_PER_GROUP, BLOCK_KW)  # fmt: skip
        k = word_rows * 8
        high = words >> 16  # nibbles 6-7 moved to bits 8-15
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k, row_ok, 0)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k + 1, row_ok, 1)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k + 2, row_ok, 2)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k + 3, row_ok, 3)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k + 4, row_ok, 4)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k + 5, row_ok, 5)
        dot, x_sum = _add_nibble(dot, x_sum, high, x_ptr, k + 6, row_ok, 2)
        dot, x_sum = _add_nibble(dot, x_sum, high, x_ptr, k + 7, row_ok, 3)
    next_words = _word_tile(qweight_ptr, (group + 1) * WORDS_PER_GROUP, cols, col_ok, N,
                            groups_end * WORDS_PER_GROUP, BLOCK_KW)  # fmt: skip
    return dot, x_sum, next_words


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,  # [K] activations
    qweight_ptr,  # [K / 8, N] int32
    scales_ptr,  # [K / g, N]
    zeros_ptr,  # [K / g, N]
    bias_ptr,  # [N] (read when HAS_BIAS)
    out_ptr,  # [N] in the activation dtype
    partial_ptr,  # [SPLIT_K, N] float32 scratch (SPLIT_K > 1)
    arrivals_ptr,  # [N tiles] int32, zero between launches (SPLIT_K > 1)
    N,
    GROUPS: tl.constexpr,  # K / g, static per layer (constant loop bounds)
    GROUPS_PER_SPLIT: tl.constexpr,  # the last split's tail past GROUPS is masked
    WORDS_PER_GROUP: tl.constexpr,  # g / 8, a multiple of BLOCK_KW
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr,
    LATE_SUM: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    let_next_kernel_start(PDL)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    first_group = split * GROUPS_PER_SPLIT
    groups_end = tl.minimum(GROUPS, first_group + GROUPS_PER_SPLIT)
    # Each group's first word tile is read a group ahead; the first group's before the wait (PDL),
    # as no kernel writes the weights.
    words = _word_tile(qweight_ptr, first_group * WORDS_PER_GROUP, cols, col_ok, N, GROUPS * WORDS_PER_GROUP,
                       BLOCK_KW)  # fmt: skip
    if LATE_SUM:
        # Scales and zero points a group ahead too: they reach the sums' layout through shared
        # memory, and a barrier there would otherwise wait for their load.
        scale, zero = _group_scales(scales_ptr, zeros_ptr, first_group, cols, col_ok, N, groups_end)
        wait_for_previous_kernel(PDL)
        # Each thread's scaled sums of its own word rows, summed across threads once, after the
        # loop: no sum across warps (and its barriers) per group.
        sums = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
        for step in range(0, GROUPS_PER_SPLIT):
            group = first_group + step
            next_scale, next_zero = _group_scales(
                scales_ptr, zeros_ptr, group + 1, cols, col_ok, N, groups_end
            )
            dot, x_sum, words = _group_sums(x_ptr, qweight_ptr, words, group, cols, col_ok, N, groups_end,
                                            GROUPS, WORDS_PER_GROUP, BLOCK_KW)  # fmt: skip
            zero_f = zero.to(tl.float32)[None, :]
            sums += scale.to(tl.float32)[None, :] * (dot - zero_f * (x_sum * (2.0**-64))[:, None])
            scale, zero = next_scale, next_zero
        acc = tl.sum(sums, axis=0)
    else:
        wait_for_previous_kernel(PDL)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for step in range(0, GROUPS_PER_SPLIT):
            group = first_group + step
            scale, zero = _group_scales(scales_ptr, zeros_ptr, group, cols, col_ok, N, GROUPS)
            scale, zero = scale.to(tl.float32), zero.to(tl.float32)
            dot, x_sum, words = _group_sums(x_ptr, qweight_ptr, words, group, cols, col_ok, N, groups_end,
                                            GROUPS, WORDS_PER_GROUP, BLOCK_KW)  # fmt: skip
            # Folded to one value per column each group: the word rows a thread holds add up in its
            # registers, and only [BLOCK_N] sums stay live across groups.
            acc += scale * (tl.sum(dot, axis=0) - zero * (tl.sum(x_sum) * (2.0**-64)))
    finish_split(
        acc * (2.0**64), tile, split, cols, col_ok, N, partial_ptr, arrivals_ptr, bias_ptr, out_ptr,
        HAS_BIAS, SPLIT_K,
    )  # fmt: skip


# block_k counts codes per inner step, capped at the group size (a step stays inside one group). A
# whole group of 128 per step over 128-256 columns on 4 warps puts 64-128 bytes of words in flight
# per thread; split-K (whole groups per split) makes up the programs that N alone leaves short: 16-32
# splits for the 2k-6k wide layers and the long-K down projection, 4-8 for gate/up and the LM head.
# Wider N tiles (8 columns per thread) load and convert each activation for twice the codes.
# Sums across threads after the loop (late_sum) pay off where splits are many groups long (the long-K
# down projection); they cost registers, which the wide-N layers' tiles want.
ONE_ROW_CONFIGS = [
    GemvConfig(256, 128, 4, 1, split_k=16),
    GemvConfig(256, 128, 4, 1, split_k=16, late_sum=True),
    GemvConfig(256, 128, 4, 1, split_k=32),
    GemvConfig(256, 128, 4, 1, split_k=32, late_sum=True),
    GemvConfig(128, 128, 4, 1, split_k=32),
    GemvConfig(128, 128, 4, 1, split_k=32, late_sum=True),
    GemvConfig(256, 128, 4, 1, split_k=4),
    GemvConfig(512, 64, 4, 1, split_k=8),
    GemvConfig(512, 32, 2, 1, split_k=16),
    GemvConfig(1024, 32, 4, 1, split_k=8),
]


def words_per_step(block_k: int, group_size: int) -> int:
    """Word rows a program step reads: block_k / 8, cut to the largest power of two that divides the
    group's word rows (so a step never spans two groups)."""
    group_words = group_size // CODES_PER_WORD
    return min(block_k // CODES_PER_WORD, group_words & -group_words)


def candidate_plans(one_row: bool, group_size: int) -> list[GemvConfig | W4A16Config]:
    """What start-up tuning times (the first: untuned): for one row this GEMV, for 2..16 rows the
    GEMM kernel with narrow tiles; for both, last, the GEMM kernel with split-K as it chose before."""
    block_k = min(128, group_size)
    # What the GEMM kernel chose for decode before (at 4096-wide layers), kept as the fallback.
    gemm_split = W4A16Config(16, 64, block_k, 4, num_warps=4, num_stages=4)
    if one_row:
        return [*ONE_ROW_CONFIGS, gemm_split]
    return [
        W4A16Config(16, 32, block_k, 1, num_warps=4, num_stages=4),
        W4A16Config(16, 16, block_k, 1, num_warps=4, num_stages=4),
        W4A16Config(16, 32, block_k, 4, num_warps=4, num_stages=4),
        gemm_split,
    ]


def w4a16_gemv(
    x: torch.Tensor,  # [1, K] contiguous
    packed: PackedInt4,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """[1, N] in x's dtype: x W^T + bias, accumulated in fp32."""
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != packed.in_features or not x.is_contiguous():
        raise ValueError(f"x must be [1, {packed.in_features}] and contiguous, got {tuple(x.shape)}")
    if packed.group_size % CODES_PER_WORD:
        raise ValueError(f"groups of {packed.group_size} inputs do not hold whole packed words")
    cfg = config or ONE_ROW_CONFIGS[0]
    out_features = packed.out_features
    block_kw = words_per_step(cfg.block_k, packed.group_size)
    groups = packed.in_features // packed.group_size
    tiles = triton.cdiv(out_features, cfg.block_n)
    out = torch.empty((1, out_features), dtype=x.dtype, device=x.device)
    partials, arrivals = split_buffers(out, cfg.split_k, out_features, tiles)
    _w4a16_gemv_kernel[(tiles, cfg.split_k)](
        x, packed.qweight, packed.scales, packed.zeros, out if bias is None else bias, out, partials, arrivals,
        out_features,
        GROUPS=groups, GROUPS_PER_SPLIT=triton.cdiv(groups, cfg.split_k),
        WORDS_PER_GROUP=packed.group_size // CODES_PER_WORD, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n,
        BLOCK_KW=block_kw, SPLIT_K=cfg.split_k, LATE_SUM=cfg.late_sum, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_launch(x.device),
    )  # fmt: skip
    return out
