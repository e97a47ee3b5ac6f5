"""The inner step shared by the decode and prefill kernels: one online-softmax update over a paged KV tile.

Query rows are [BLOCK_M, BLOCK_D] (query heads of one KV group, possibly of several tokens); the
tile is BLOCK_N consecutive context tokens gathered through the block table. Scores live in the log2
domain (qk_scale already holds log2(e)), so exp2 replaces exp; the running max is kept scaled. An FP8
cache's tiles are widened to the query dtype as they load (its value tiles, with FP8_IN_REGISTERS, to
fp16 in registers); its k_scale is folded into qk_scale and its v_scale applied by the caller. A
soft-cap cap * tanh(s / cap) reads the same in the log2 domain with the cap times log2(e) (`softcap`,
used when SOFTCAP is set). An attention sink (a head's learned logit, joining the softmax as a score
without a value) enters once the tiles are summed (fold_sink), in the log2 domain too: times log2(e),
never times the FP8 cache's k_scale nor soft-capped, as it is no product with a key.

tl.arange needs a power of two, so a head dim that is not one (80, 96) is padded to BLOCK_D, the next
one: the padding reads as zeros in queries, keys and values, so it adds nothing to the scores and
its outputs are never stored. Where HEAD_DIM == BLOCK_D (64, 128) no dimension mask is compiled in.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchlm.kernels.shapes import LOG2_E

# Mask modes: what a tile must hide (constexpr objects, so jit code may read them as globals).
MASK_NONE = tl.constexpr(0)  # every token of the tile is in the context and visible to every row
MASK_RANGE = tl.constexpr(1)  # hide tokens at or past kv_end
MASK_CAUSAL = tl.constexpr(2)  # MASK_RANGE, and hide tokens after each row's own position
MASK_WINDOW = tl.constexpr(3)  # MASK_CAUSAL, and hide tokens `window` or more before each row's position
SINK_TO_LOG2 = tl.constexpr(LOG2_E)  # a sink logit read in a kernel, into the log2 domain


@triton.jit
def soft_cap(scores, cap):
    # cap * tanh(scores / cap), with tanh from exp2 of a non-positive argument (no overflow).
    x = scores / cap
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x < 0.0, -t, t)


@triton.jit
def widen_e4m3(codes):
    """e4m3 codes -> fp16, four at a time, by an inline conversion Triton cannot move past the load:
    the tile then goes to shared memory as fp16 and to the tensor cores by ldmatrix, where a plain
    cast is applied after shared memory and reads it a byte at a time in the dot's operand layout."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b16 lo, hi;
        mov.b32 {lo, hi}, $2;
        cvt.rn.f16x2.e4m3x2 $0, lo;
        cvt.rn.f16x2.e4m3x2 $1, hi;
        }""",
        constraints="=r,=r,r",
        args=[codes.to(tl.int8, bitcast=True)],
        dtype=tl.float16,
        is_pure=False,  # a pure op would be moved to the dot's operand, as a plain cast is
        pack=4,
    )


@triton.jit
def tile_addresses(
    block_row, tile_start, kv_end, stride_c_block, stride_c_tok, BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
):  # fmt: skip
    """(tokens [BLOCK_N], in_range [BLOCK_N], key offsets from kv_base [BLOCK_N, BLOCK_D]) of the tile
    from `tile_start`, its block ids read from the request's block-table row."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    in_range = tokens < kv_end
    if MASK_MODE == 0:
        blocks = tl.load(block_row + tokens // BLOCK_SIZE)
    else:
        blocks = tl.load(block_row + tokens // BLOCK_SIZE, mask=in_range, other=0)
    # Block ids are never negative: widened unsigned, each takes one 32 x 32 -> 64-bit multiply,
    # where a signed 64-bit product takes four instructions (the loop is bound by issue slots).
    block_starts = blocks.to(tl.uint32, bitcast=True).to(tl.uint64) * stride_c_block.to(tl.uint64)
    rows = block_starts + (tokens % BLOCK_SIZE) * stride_c_tok  # [BLOCK_N]
    return tokens, in_range, rows[:, None] + dims[None, :]


@triton.jit
def load_rows(ptrs, in_range, MASK_MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] key or value tile; rows out of range, and the dimensions a head dim that is
    not a power of two is padded with, read as zeros (they add nothing to the dots)."""
    if HEAD_DIM == BLOCK_D:
        if MASK_MODE == 0:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=in_range[:, None], other=0.0)
    else:
        in_head = tl.arange(0, BLOCK_D) < HEAD_DIM
        if MASK_MODE == 0:
            tile = tl.load(ptrs, mask=in_head[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=in_range[:, None] & in_head[None, :], other=0.0)
    return tile


@triton.jit
def softmax_update(
    q, k, row_max, row_sum, q_pos, tokens, in_range, qk_scale, window, softcap,
    MASK_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """The tile's probabilities [BLOCK_M, BLOCK_N], the factor rescaling what was summed before, and
    the new running max and denominator."""
    k = k.to(q.dtype)  # no-op unless the cache is FP8
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], unscaled
    if SOFTCAP:
        scores = soft_cap(scores * qk_scale, softcap)
    if MASK_MODE == 1:
        scores = tl.where(in_range[None, :], scores, float("-inf"))
    if MASK_MODE == 2:
        visible = in_range[None, :] & (tokens[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    if MASK_MODE == 3:
        distance = q_pos[:, None] - tokens[None, :]
        visible = in_range[None, :] & (distance >= 0) & (distance < window)
        scores = tl.where(visible, scores, float("-inf"))
    # row_max starts finite (-1e30), so a row with nothing visible yet never computes inf - inf.
    if SOFTCAP:
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probs = tl.exp2(scores - new_max[:, None])  # [BLOCK_M, BLOCK_N]
    else:
        # The scale (positive) commutes with the max, so it joins the subtraction in one FMA a score:
        # at head dim 64 the softmax's per-score instructions, not the dots, bound the prefill kernel.
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
        probs = tl.exp2(scores * qk_scale - new_max[:, None])
    rescale = tl.exp2(row_max - new_max)
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    return probs, rescale, new_max, row_sum


@triton.jit
def sink_logits(sinks_ptr, heads, head_mask):
    """The sinks of `heads` [M] in the log2 domain (any float dtype, read as fp32); masked heads: 0."""
    return tl.load(sinks_ptr + heads, mask=head_mask, other=0.0).to(tl.float32) * SINK_TO_LOG2


@triton.jit
def fold_sink(acc, row_max, row_sum, sink):
    """acc [M, D] and row_sum [M] with each row's sink (log2 domain) as one more score whose value is
    zero: both rescaled to the new max, the sink's weight added to the denominator only. A row that saw
    no key (row_max still -1e30, acc 0) keeps acc 0 and gets a denominator of 1."""
    new_max = tl.maximum(row_max, sink)
    rescale = tl.exp2(row_max - new_max)
    return acc * rescale[:, None], row_sum * rescale + tl.exp2(sink - new_max)


@triton.jit
def values_update(
    acc, probs, rescale, v, q_dtype: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8_IN_REGISTERS: tl.constexpr,
):  # fmt: skip
    """acc rescaled, plus the tile's probabilities times its values."""
    if FP8_IN_REGISTERS:
        # Values feed the dot along their token axis, which a byte-wide tile cannot be read along
        # from shared memory in wide loads; keys feed it along the contiguous head dim, so a cast is
        # cheaper for them.
        v = widen_e4m3(v)
    else:
        v = v.to(q_dtype)
    return acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)


@triton.jit
def attend_tile(
    q,  # [BLOCK_M, BLOCK_D] query rows
    acc,  # [BLOCK_M, BLOCK_D] fp32 running numerator
    row_max,  # [BLOCK_M] fp32 running max score (log2 domain)
    row_sum,  # [BLOCK_M] fp32 running denominator
    q_pos,  # [BLOCK_M] int32 absolute positions (read only with MASK_CAUSAL / MASK_WINDOW)
    kv_base,  # pointer: cache + kv_head * stride_c_head (keys; values at + stride_c_kv)
    block_row,  # pointer: this request's block-table row
    tile_start,
    kv_end,
    qk_scale,
    window,  # sliding window (read only with MASK_WINDOW)
    softcap,  # soft-cap * log2(e) (read only with SOFTCAP)
    stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    FP8_IN_REGISTERS: tl.constexpr = False,  # widen FP8 values with widen_e4m3
):  # fmt: skip
    tokens, in_range, offsets = tile_addresses(
        block_row, tile_start, kv_end, stride_c_block, stride_c_tok, BLOCK_SIZE, BLOCK_D, BLOCK_N, MASK_MODE
    )
    k_ptrs = kv_base + offsets
    k = load_rows(k_ptrs, in_range, MASK_MODE, HEAD_DIM, BLOCK_D)
    probs, rescale, row_max, row_sum = softmax_update(
        q, k, row_max, row_sum, q_pos, tokens, in_range, qk_scale, window, softcap,
        MASK_MODE, DOT_PRECISION, SOFTCAP,
    )  # fmt: skip
    v = load_rows(k_ptrs + stride_c_kv, in_range, MASK_MODE, HEAD_DIM, BLOCK_D)
    acc = values_update(acc, probs, rescale, v, q.dtype, DOT_PRECISION, FP8_IN_REGISTERS)
    return acc, row_max, row_sum


@triton.jit
def attend_range(
    q, acc, row_max, row_sum, q_pos, kv_base, block_row,
    kv_start,  # first context token of the range (BLOCK_N-aligned where MASK_MODE is 0)
    kv_stop,  # loop bound: tiles start below it
    kv_end,  # tokens at or past it are hidden (MASK_RANGE / MASK_CAUSAL / MASK_WINDOW)
    qk_scale, window, softcap, stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, FP8_IN_REGISTERS: tl.constexpr = False,
):  # fmt: skip
    for tile_start in range(kv_start, kv_stop, BLOCK_N):
        acc, row_max, row_sum = attend_tile(
            q, acc, row_max, row_sum, q_pos, kv_base, block_row, tile_start, kv_end, qk_scale, window, softcap,
            stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE,
            HEAD_DIM, BLOCK_D, BLOCK_N, MASK_MODE, DOT_PRECISION, SOFTCAP, FP8_IN_REGISTERS,
        )  # fmt: skip
    return acc, row_max, row_sum
