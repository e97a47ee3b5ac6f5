"""The inner step shared by the decode and prefill kernels: one online-softmax update over a paged KV tile.

Query rows are [BLOCK_M, HEAD_DIM] (query heads of one KV group, possibly of several tokens); the
tile is BLOCK_N consecutive context tokens gathered through the block table. Scores live in the log2
domain (qk_scale already holds log2(e)), so exp2 replaces exp.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Mask modes: what a tile must hide (constexpr objects, so jit code may read them as globals).
MASK_NONE = tl.constexpr(0)  # every token of the tile is in the context and visible to every row
MASK_RANGE = tl.constexpr(1)  # hide tokens at or past kv_end
MASK_CAUSAL = tl.constexpr(2)  # MASK_RANGE, and hide tokens after each row's own position


@triton.jit
def attend_tile(
    q,  # [BLOCK_M, HEAD_DIM] query rows
    acc,  # [BLOCK_M, HEAD_DIM] fp32 running numerator
    row_max,  # [BLOCK_M] fp32 running max score (log2 domain)
    row_sum,  # [BLOCK_M] fp32 running denominator
    q_pos,  # [BLOCK_M] int32 absolute positions (read only with MASK_CAUSAL)
    kv_base,  # pointer: cache + kv_head * stride_c_head (keys; values at + stride_c_kv)
    block_row,  # pointer: this request's block-table row
    tile_start,
    kv_end,
    qk_scale,
    stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    tokens = tile_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    if MASK_MODE == 0:
        blocks = tl.load(block_row + tokens // BLOCK_SIZE)
    else:
        in_range = tokens < kv_end
        blocks = tl.load(block_row + tokens // BLOCK_SIZE, mask=in_range, other=0)
    rows = blocks.to(tl.int64) * stride_c_block + (tokens % BLOCK_SIZE) * stride_c_tok  # [BLOCK_N]
    k_ptrs = kv_base + rows[:, None] + dims[None, :]  # [BLOCK_N, HEAD_DIM]
    if MASK_MODE == 0:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASK_MODE == 1:
        scores = tl.where(in_range[None, :], scores, float("-inf"))
    if MASK_MODE == 2:
        visible = in_range[None, :] & (tokens[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    # row_max starts finite (-1e30), so a row with nothing visible yet never computes inf - inf.
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    rescale = tl.exp2(row_max - new_max)
    probs = tl.exp2(scores - new_max[:, None])  # [BLOCK_M, BLOCK_N]
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    if MASK_MODE == 0:
        v = tl.load(k_ptrs + stride_c_kv)
    else:
        v = tl.load(k_ptrs + stride_c_kv, mask=in_range[:, None], other=0.0)
    acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def attend_range(
    q, acc, row_max, row_sum, q_pos, kv_base, block_row,
    kv_start,  # first context token of the range (BLOCK_N-aligned where MASK_MODE is 0)
    kv_stop,  # loop bound: tiles start below it
    kv_end,  # tokens at or past it are hidden (MASK_RANGE / MASK_CAUSAL)
    qk_scale, stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    for tile_start in range(kv_start, kv_stop, BLOCK_N):
        acc, row_max, row_sum = attend_tile(
            q, acc, row_max, row_sum, q_pos, kv_base, block_row, tile_start, kv_end, qk_scale,
            stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE,
            HEAD_DIM, BLOCK_N, MASK_MODE, DOT_PRECISION,
        )  # fmt: skip
    return acc, row_max, row_sum


@triton.jit
def _tile_pointers(
    kv_base, blocks, tokens, stride_c_block, stride_c_tok, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr
):
    rows = blocks.to(tl.int64) * stride_c_block + (tokens % BLOCK_SIZE) * stride_c_tok  # [BLOCK_N]
    return kv_base + rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]  # [BLOCK_N, HEAD_DIM] key pointers


@triton.jit
def attend_range_prefetched(
    q, acc, row_max, row_sum, kv_base, block_row, kv_start, kv_end, qk_scale,
    stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """attend_range(MASK_RANGE) with software prefetch for latency-bound decode: block ids are read
    two tiles ahead and K/V one tile ahead of the math, so a tile costs one memory round trip."""
    offsets = tl.arange(0, BLOCK_N)
    tokens = kv_start + offsets
    in_range = tokens < kv_end
    blocks = tl.load(block_row + tokens // BLOCK_SIZE, mask=in_range, other=0)
    ptrs = _tile_pointers(kv_base, blocks, tokens, stride_c_block, stride_c_tok, BLOCK_SIZE, HEAD_DIM)
    k = tl.load(ptrs, mask=in_range[:, None], other=0.0)
    v = tl.load(ptrs + stride_c_kv, mask=in_range[:, None], other=0.0)
    ahead = tokens + BLOCK_N
    next_blocks = tl.load(block_row + ahead // BLOCK_SIZE, mask=ahead < kv_end, other=0)
    for tile_start in range(kv_start, kv_end, BLOCK_N):
        # Loads for the next tile (fully masked past the end: no traffic), ids for the one after.
        ahead = tile_start + BLOCK_N + offsets
        ptrs = _tile_pointers(kv_base, next_blocks, ahead, stride_c_block, stride_c_tok, BLOCK_SIZE, HEAD_DIM)
        next_k = tl.load(ptrs, mask=(ahead < kv_end)[:, None], other=0.0)
        next_v = tl.load(ptrs + stride_c_kv, mask=(ahead < kv_end)[:, None], other=0.0)
        further = ahead + BLOCK_N
        next_blocks = tl.load(block_row + further // BLOCK_SIZE, mask=further < kv_end, other=0)
        # Online softmax over the current tile.
        in_range = (tile_start + offsets) < kv_end
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        scores = tl.where(in_range[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        rescale = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
        k = next_k
        v = next_v
    return acc, row_max, row_sum
