"""Triton paged decode attention: one query token per request, GQA-grouped, split-KV with an LSE reduce.

Grid (batch, kv_heads, splits): a program holds all query heads of one KV group, so each K/V row is
read once per group; with splits > 1 each program covers a slice of the context and a second kernel
merges the slices by log-sum-exp (flash-decoding). The grid depends only on the (padded) batch size
and static configuration; context lengths come from the device `seq_lens`, so the launch can be
captured in a CUDA graph and replayed with new lengths and block tables. With PDL a program reads
its first tile before waiting for the kernel before it (kernels/pdl.py) when the context is split.
Attention sinks (SINKS, a device tensor of one logit a head) join each head's softmax exactly once:
after its only slice, or in the merge as one more slice whose output is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from batchlm.kernels.fp8_types import FP8_DTYPE
from batchlm.kernels.paged_tile import (
    MASK_RANGE,
    SINK_TO_LOG2,
    attend_range,
    fold_sink,
    load_rows,
    sink_logits,
    softmax_update,
    tile_addresses,
    values_update,
)
from batchlm.kernels.pdl import let_next_kernel_start, pdl_launch, wait_for_previous_kernel
from batchlm.kernels.shapes import (
    LOG2_E,
    MAX_SPLITS,
    check_paged_inputs,
    choose_num_splits,
    dot_precision,
    newest_rows,
    next_power_of_2,
    sm_count,
)
from batchlm.kernels.specialization import unspecialized


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel (tuned by benchmarks/attention_kernels.py)."""

    block_n: int = 64  # context tokens per inner-loop tile
    num_warps: int = 4
    num_stages: int = 2
    # Aim for this many programs per SM when choosing the number of splits.
    programs_per_sm: int = 4
    # FP8 cache: widen value tiles in registers before shared memory (paged_tile.widen_e4m3).
    fp8_in_registers: bool = False


# An FP8 tile is half the bytes of a bf16 one: twice the tokens keep as many bytes in flight.
FP8_DECODE_CONFIG = DecodeConfig(block_n=128, num_stages=3, fp8_in_registers=True)


def default_decode_config(cache_dtype: torch.dtype) -> DecodeConfig:
    return FP8_DECODE_CONFIG if cache_dtype == FP8_DTYPE else DecodeConfig()


@triton.jit(**unspecialized(ints=["stride_bt"], pointers=["block_table_ptr", "seq_lens_ptr", "sinks_ptr"]))
def _decode_kernel(
    q_ptr,  # [B, H, HEAD_DIM]
    cache_ptr,  # [2, num_blocks, block_size, KV_HEADS, HEAD_DIM]
    block_table_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, HEAD_DIM]: written when NUM_SPLITS == 1
    part_out_ptr,  # [B, H, NUM_SPLITS, HEAD_DIM] fp32: written when NUM_SPLITS > 1
    part_lse_ptr,  # [B, H, NUM_SPLITS] fp32, log2 domain
    qk_scale,  # softmax scale * log2(e)
    window,  # sliding window (read only with WINDOWED)
    softcap,  # soft-cap * log2(e) (read only with SOFTCAP)
    sinks_ptr,  # [H] each query head's sink logit (read only with SINKS, and NUM_SPLITS == 1)
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_c_kv, stride_c_block, stride_c_tok, stride_c_head,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    FP8_IN_REGISTERS: tl.constexpr, PDL: tl.constexpr,
    NEWEST: tl.constexpr = 0,  # a context's last tokens the step's KV write may change; 0: any
    SINKS: tl.constexpr = False,  # each head's softmax holds its sink logit (the reduce's, when split)
):  # fmt: skip
    let_next_kernel_start(PDL)
    # Only a split context (a small batch, where a program's first wait on memory is the step's
    # latency) reads its first tile early; a full batch waits first, as every other kernel does:
    # there the early tile's registers cost more than it hides (BENCHMARKS.md).
    EARLY_TILE: tl.constexpr = NUM_SPLITS > 1
    if not EARLY_TILE:
        wait_for_previous_kernel(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    # The query sees [first, seq_len): its window, or the whole context.
    first = 0
    if WINDOWED:
        first = tl.maximum(seq_len - window, 0)
    # Splits cover BLOCK_N-sized slices from `first`; the reduce recomputes the same slicing.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    kv_base = cache_ptr + kv_head * stride_c_head
    block_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    if EARLY_TILE:
        # The first tile is read before waiting for the kernel before (PDL): the lengths and block
        # tables come from the host before the step. The step's KV write changes a context's last
        # tokens (a request's newest, and in the decode rows of a verify chunk, runner/
        # decode_rows.py, that chunk's earlier ones too: NEWEST at most, any row of the tile when
        # NEWEST is 0), so those rows are read again after the wait, from L2 where the early read
        # brought them: one round trip instead of the three dependent ones (length, block id, tile)
        # a kernel that waits first makes to memory. A split whose tile holds none of them reads
        # nothing again.
        tokens, in_range, offsets = tile_addresses(
            block_row, start, end, stride_c_block, stride_c_tok, BLOCK_SIZE, BLOCK_D, BLOCK_N, MASK_RANGE
        )
        k_ptrs = kv_base + offsets
        k = load_rows(k_ptrs, in_range, MASK_RANGE, HEAD_DIM, BLOCK_D)
        v = load_rows(k_ptrs + stride_c_kv, in_range, MASK_RANGE, HEAD_DIM, BLOCK_D)
        wait_for_previous_kernel(PDL)
        changed = in_range
        if NEWEST > 0:
            changed = changed & (tokens >= seq_len - NEWEST)
        written = changed[:, None]
        if HEAD_DIM != BLOCK_D:
            written = written & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
        k = tl.load(k_ptrs, mask=written, other=k)
        v = tl.load(k_ptrs + stride_c_kv, mask=written, other=v)

    groups = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + groups  # query heads of this KV group (HF repeat_kv order)
    head_mask = groups < GROUP
    # [BLOCK_G, BLOCK_D]: real heads, and real dims where the head dim is padded (paged_tile.py)
    row_mask = head_mask[:, None]
    if HEAD_DIM != BLOCK_D:
        row_mask = row_mask & (dims < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_mask,
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        # e4m3 is exact in fp16 as in bf16, and its tiles widen to fp16 faster (BENCHMARKS.md), so
        # they meet fp16 queries: scaled by a power of two into fp16's range, undone in qk_scale.
        q32 = q.to(tl.float32)
        shift = tl.maximum(tl.ceil(tl.log2(tl.max(tl.max(tl.abs(q32), 1), 0) / 16384.0)), 0.0)
        q = (q32 * tl.exp2(-shift)).to(tl.float16)
        qk_scale = qk_scale * tl.exp2(shift)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    rest = start
    if EARLY_TILE:
        # The first tile, then the rest of the range as the prefill kernel walks it. An empty range
        # (a padding row, a split past the context) leaves the sums as they started.
        probs, rescale, row_max, row_sum = softmax_update(
            q, k, row_max, row_sum, seq_len, tokens, in_range, qk_scale, window, softcap,
            MASK_RANGE, DOT_PRECISION, SOFTCAP,
        )  # fmt: skip
        acc = values_update(acc, probs, rescale, v, q.dtype, DOT_PRECISION, FP8_IN_REGISTERS)
        rest = start + BLOCK_N
    acc, row_max, row_sum = attend_range(
        q, acc, row_max, row_sum, seq_len, kv_base, block_row, rest, end, end, qk_scale, window, softcap,
        stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE,
        HEAD_DIM, BLOCK_D, BLOCK_N, MASK_RANGE, DOT_PRECISION, SOFTCAP, FP8_IN_REGISTERS,
    )  # fmt: skip
    if NUM_SPLITS == 1:
        if SINKS:
            acc, row_sum = fold_sink(acc, row_max, row_sum, sink_logits(sinks_ptr, heads, head_mask))
        # Padding rows (seq_len 0) saw nothing: row_sum 0 (1 with a sink), output zeros.
        result = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
        out = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        if start < end:
            # Each slice stores its normalised result and its log2-sum-exp weight.
            row = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_G]
            part = part_out_ptr + row[:, None] * HEAD_DIM + dims[None, :]
            tl.store(part, acc / row_sum[:, None], mask=row_mask)
            tl.store(part_lse_ptr + row, row_max + tl.log2(row_sum), mask=head_mask)


@triton.jit(**unspecialized(pointers=["seq_lens_ptr", "sinks_ptr"]))
def _reduce_kernel(
    part_out_ptr,  # [B, H, NUM_SPLITS, HEAD_DIM] fp32
    part_lse_ptr,  # [B, H, NUM_SPLITS] fp32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, HEAD_DIM]
    sinks_ptr,  # [H] each query head's sink logit (read only with SINKS)
    window,  # sliding window (read only with WINDOWED)
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    CHUNK: tl.constexpr,
    WINDOWED: tl.constexpr,
    PDL: tl.constexpr,
    SINKS: tl.constexpr = False,  # each head's sink joins the merge as a slice whose output is zero
):
    let_next_kernel_start(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    # The length comes from the host before the step: read before the wait (kernels/pdl.py).
    seq_len = tl.load(seq_lens_ptr + seq)
    span = seq_len
    if WINDOWED:
        span = seq_len - tl.maximum(seq_len - window, 0)
    tokens_per_split = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    # Only splits that started inside the visible span wrote anything.
    used_splits = tl.cdiv(span, tl.maximum(tokens_per_split, 1))
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    wait_for_previous_kernel(PDL)
    # One pass over chunks of CHUNK splits (bounding the registers a [splits, HEAD_DIM] tile would
    # take), merged by a running max: a chunk's weights and outputs load together, so the usual
    # case (every used split in the first chunk) waits on memory once.
    top = tl.full([1], -1.0e30, dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    if SINKS:
        # The merge starts from the sink: its weight exp2(sink - top) is 1, and it adds no output.
        top = tl.zeros([1], dtype=tl.float32) + tl.load(sinks_ptr + head).to(tl.float32) * SINK_TO_LOG2
        total = total + 1.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, NUM_SPLITS, CHUNK):
        if first < used_splits:
            chunk = first + tl.arange(0, CHUNK)
            valid = chunk < used_splits
            lse = tl.load(part_lse_ptr + base + chunk, mask=valid, other=float("-inf"))
            part_mask = valid[:, None]
            if HEAD_DIM != BLOCK_D:
                part_mask = part_mask & (dims < HEAD_DIM)[None, :]
            parts = tl.load(
                part_out_ptr + (base + chunk)[:, None] * HEAD_DIM + dims[None, :],
                mask=part_mask,
                other=0.0,
            )
            new_top = tl.maximum(top, tl.max(lse, 0))
            rescale = tl.exp2(top - new_top)
            weights = tl.exp2(lse - new_top)  # 0 for splits that wrote nothing
            total = total * rescale + tl.sum(weights, 0)
            acc = acc * rescale + tl.sum(parts * weights[:, None], 0)
            top = new_top
    result = acc / tl.where(total > 0.0, total, 1.0)  # [BLOCK_D]; seq_len 0: zeros (with a sink too)
    out = out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + dims
    if HEAD_DIM == BLOCK_D:
        tl.store(out, result.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def paged_decode_attention(
    query: torch.Tensor,  # [B, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [B] int32; 0 = padding row (output zeros)
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    scale: float,
    out: torch.Tensor | None = None,  # [B, num_heads, head_dim]; allocated when None
    num_splits: int | None = None,  # None = chosen from batch size and max_blocks_per_seq
    config: DecodeConfig | None = None,
    window: int | None = None,  # attend to the last `window` tokens only
    softcap: float | None = None,  # scores become softcap * tanh(scores / softcap)
    newest: int | None = None,  # most of a context's last tokens the step wrote before; None: unknown
    sinks: torch.Tensor | None = None,  # [num_heads] each head's sink logit (float, on the device)
) -> torch.Tensor:
    """Attention of each request's single query token over its paged context (or window of it), each
    head's sink logit, where given, one more score of its softmax with no value."""
    shape = check_paged_inputs(query, kv_cache, sinks)
    cfg = config or default_decode_config(kv_cache.dtype)
    batch = query.shape[0]
    if seq_lens.shape[0] < batch or block_tables.shape[0] < batch:
        raise ValueError(f"seq_lens / block_tables cover fewer than the {batch} decode rows")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be contiguous along the block axis")
    if out is None:
        out = torch.empty_like(query)
    if batch == 0:
        return out
    if num_splits is None:
        max_context = block_tables.shape[1] * shape.block_size
        num_splits = choose_num_splits(
            batch, shape.num_kv_heads, max_context, sm_count(query.device), cfg.programs_per_sm
        )
    num_splits = max(1, min(num_splits, MAX_SPLITS))
    fp8_cache = kv_cache.dtype == FP8_DTYPE
    pdl = pdl_launch(query.device)
    part_out = part_lse = out  # placeholders: the single-split kernel never touches them
    sinks_arg = out if sinks is None else sinks  # a placeholder likewise without SINKS
    if num_splits > 1:
        part_out = query.new_empty((batch, shape.num_heads, num_splits, shape.head_dim), dtype=torch.float32)
        part_lse = query.new_empty((batch, shape.num_heads, num_splits), dtype=torch.float32)
    _decode_kernel[(batch, shape.num_kv_heads, num_splits)](
        query, kv_cache, block_tables, seq_lens, out, part_out, part_lse, scale * LOG2_E,
        window or 0, (softcap or 1.0) * LOG2_E, sinks_arg,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), BLOCK_SIZE=shape.block_size,
        GROUP=shape.group_size, BLOCK_G=max(16, next_power_of_2(shape.group_size)),
        HEAD_DIM=shape.head_dim, BLOCK_D=next_power_of_2(shape.head_dim), BLOCK_N=cfg.block_n,
        NUM_SPLITS=num_splits, DOT_PRECISION=dot_precision(query.dtype), WINDOWED=window is not None, SOFTCAP=softcap is not None,
        FP8_IN_REGISTERS=fp8_cache and cfg.fp8_in_registers, **pdl,
        NEWEST=newest_rows(newest, cfg.block_n), SINKS=sinks is not None and num_splits == 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _reduce_kernel[(batch, shape.num_heads)](
            part_out, part_lse, seq_lens, out, sinks_arg, window or 0, out.stride(0), out.stride(1),
            HEAD_DIM=shape.head_dim, BLOCK_D=next_power_of_2(shape.head_dim), BLOCK_N=cfg.block_n,
            NUM_SPLITS=num_splits, CHUNK=min(16, next_power_of_2(num_splits)),
            WINDOWED=window is not None, SINKS=sinks is not None, num_warps=4, **pdl,
        )  # fmt: skip
    return out
