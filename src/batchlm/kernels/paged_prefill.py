"""Triton paged prefill/extend attention: new query tokens over their request's paged context, causally.

Grid (requests, query tiles, kv_heads). A program's query rows pack TOKENS_PER_TILE tokens times the
GROUP query heads of one KV head (row r = token r // GROUP, head r % GROUP), so every K/V tile it
gathers serves the whole group. Keys come from the cache only: prefix-cached blocks, earlier chunks
and this step's tokens (written there first by the KV write). Flash-attention style: tiles of keys
below the tile's first query position need no mask; only the diagonal stretch is masked causally.
On a sliding-window layer the loop starts at the tile's earliest visible key and masks every tile.
Each head's attention sink (SINKS) joins its rows' softmax once their tiles are summed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from batchlm.kernels.paged_tile import (
    MASK_CAUSAL,
    MASK_NONE,
    MASK_WINDOW,
    attend_range,
    fold_sink,
    sink_logits,
)
from batchlm.kernels.shapes import (
    LOG2_E,
    PagedShape,
    check_paged_inputs,
    dot_precision,
    next_power_of_2,
    sm_count,
)
from batchlm.kernels.specialization import unspecialized


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel."""

    block_m: int  # query rows (tokens x group heads) per program
    block_n: int  # context tokens per inner-loop tile
    num_warps: int
    num_stages: int


def default_prefill_config(
    shape: PagedShape, dtype: torch.dtype, num_query_tokens: int, num_sms: int
) -> PrefillConfig:
    """Tiles that fit Hopper's shared memory, picked with benchmarks/attention_kernels.py on an H100;
    query tiles shrink while the grid (num_query_tokens summed over requests) would not fill the GPU."""
    chain = _config_chain(shape, dtype)
    chosen = chain[-1]
    for cfg in chain[:-1]:
        if _num_programs(shape, cfg, num_query_tokens) >= num_sms:
            chosen = cfg
            break
    return _fit_group(shape, chosen)


def prefill_configs(shape: PagedShape, dtype: torch.dtype) -> list[PrefillConfig]:
    """Every configuration default_prefill_config can return for this shape (start-up compiles them all)."""
    return list(dict.fromkeys(_fit_group(shape, cfg) for cfg in _config_chain(shape, dtype)))


def _config_chain(shape: PagedShape, dtype: torch.dtype) -> list[PrefillConfig]:
    """The largest tile first, then each halving down to the smallest tile worth having."""
    if dtype == torch.float32 or shape.head_dim > 128:
        cfg = PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    elif shape.head_dim > 64:
        cfg = PrefillConfig(block_m=128, block_n=32, num_warps=8, num_stages=2)
    else:
        cfg = PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    chain = [cfg]
    smallest = max(32, next_power_of_2(shape.group_size))
    while cfg.block_m > smallest:
        # Few, long programs (chunked prefill over a long context) gain from a deeper K/V pipeline
        # where shared memory allows (BENCHMARKS.md, "Figures that left the source").
        deep = dtype != torch.float32 and shape.head_dim <= 128
        cfg = PrefillConfig(
            block_m=cfg.block_m // 2,
            block_n=64 if deep else cfg.block_n,
            num_warps=4,
            num_stages=3 if deep else cfg.num_stages,
        )
        chain.append(cfg)
    return chain


def _fit_group(shape: PagedShape, cfg: PrefillConfig) -> PrefillConfig:
    # A tile must hold at least one token's whole head group.
    return replace(cfg, block_m=max(cfg.block_m, next_power_of_2(shape.group_size)))


def _num_programs(shape: PagedShape, cfg: PrefillConfig, num_query_tokens: int) -> int:
    tokens_per_tile = max(1, cfg.block_m // shape.group_size)
    return triton.cdiv(num_query_tokens, tokens_per_tile) * shape.num_kv_heads


@triton.jit(
    **unspecialized(
        ints=["stride_bt"], pointers=["block_table_ptr", "seq_lens_ptr", "query_start_ptr", "sinks_ptr"]
    )
)
def _prefill_kernel(
    q_ptr,  # [T, H, HEAD_DIM]
    cache_ptr,  # [2, num_blocks, block_size, KV_HEADS, HEAD_DIM]
    block_table_ptr,  # [R, max_blocks] int32
    seq_lens_ptr,  # [R] int32: context length after this step
    query_start_ptr,  # [R + 1] int32: absolute query rows of each request
    out_ptr,  # [T, H, HEAD_DIM]
    qk_scale,  # softmax scale * log2(e)
    window,  # sliding window (read only with WINDOWED)
    softcap,  # soft-cap * log2(e) (read only with SOFTCAP)
    sinks_ptr,  # [H] each query head's sink logit (read only with SINKS)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_block, stride_c_tok, stride_c_head,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr = False,  # each head's softmax holds its sink logit
):  # fmt: skip
    req = tl.program_id(0)
    # Causal tiles further down the chunk see more keys: they start first, so that the short ones
    # fill the end of the launch instead of a few long ones running on alone.
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_start
    first_token = tile * TOKENS_PER_TILE
    if first_token < q_len:
        ctx_len = tl.load(seq_lens_ptr + req) - q_len  # tokens cached before this step's chunk
        rows = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)  # HEAD_DIM padded to a power of two (paged_tile.py)
        tokens = first_token + rows // GROUP  # [BLOCK_M] token index within the chunk
        heads = kv_head * GROUP + rows % GROUP
        row_ok = (rows < TOKENS_PER_TILE * GROUP) & (tokens < q_len)
        row_mask = row_ok[:, None]
        if HEAD_DIM != BLOCK_D:
            row_mask = row_mask & (dims < HEAD_DIM)[None, :]
        q_rows = (q_start + tokens).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
            mask=row_mask,
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        q_pos = ctx_len + tokens  # absolute positions
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        row_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        kv_base = cache_ptr + kv_head * stride_c_head
        block_row = block_table_ptr + req.to(tl.int64) * stride_bt
        kv_end = ctx_len + tl.minimum(first_token + TOKENS_PER_TILE, q_len)
        if WINDOWED:
            # From the tile holding the first row's earliest visible key; every tile masked.
            window_start = (tl.maximum(ctx_len + first_token - window + 1, 0) // BLOCK_N) * BLOCK_N
            acc, row_max, row_sum = attend_range(
                q, acc, row_max, row_sum, q_pos, kv_base, block_row, window_start, kv_end, kv_end,
                qk_scale, window, softcap, stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE,
                HEAD_DIM, BLOCK_D, BLOCK_N, MASK_WINDOW, DOT_PRECISION, SOFTCAP,
            )  # fmt: skip
        else:
            # Keys at or below the first token's position are visible to every row: no mask there.
            unmasked_stop = ((ctx_len + first_token + 1) // BLOCK_N) * BLOCK_N
            acc, row_max, row_sum = attend_range(
                q, acc, row_max, row_sum, q_pos, kv_base, block_row, 0, unmasked_stop, kv_end,
                qk_scale, window, softcap, stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE,
                HEAD_DIM, BLOCK_D, BLOCK_N, MASK_NONE, DOT_PRECISION, SOFTCAP,
            )  # fmt: skip
            acc, row_max, row_sum = attend_range(
                q, acc, row_max, row_sum, q_pos, kv_base, block_row, unmasked_stop, kv_end, kv_end,
                qk_scale, window, softcap, stride_c_kv, stride_c_block, stride_c_tok, BLOCK_SIZE,
                HEAD_DIM, BLOCK_D, BLOCK_N, MASK_CAUSAL, DOT_PRECISION, SOFTCAP,
            )  # fmt: skip
        if SINKS:
            acc, row_sum = fold_sink(acc, row_max, row_sum, sink_logits(sinks_ptr, heads, row_ok))
        result = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
        out = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=row_mask)


def paged_prefill_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]; rows addressed through query_start_loc
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [R + 1] int32, absolute row offsets into query
    seq_lens: torch.Tensor,  # [R] int32: cached + new tokens per request
    block_tables: torch.Tensor,  # [R, max_blocks_per_seq] int32
    scale: float,
    max_query_len: int,  # upper bound on any request's new tokens (sizes the grid)
    out: torch.Tensor | None = None,  # [T, num_heads, head_dim]; only the requests' rows are written
    config: PrefillConfig | None = None,  # None = default_prefill_config
    num_query_tokens: int | None = None,  # new tokens of all R requests (tile heuristic); None = R * max
    window: int | None = None,  # each token attends to the last `window` positions only
    softcap: float | None = None,  # scores become softcap * tanh(scores / softcap)
    sinks: torch.Tensor | None = None,  # [num_heads] each head's sink logit (float, on the device)
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached context plus themselves, each
    head's sink logit, where given, one more score of its softmax with no value."""
    shape = check_paged_inputs(query, kv_cache, sinks)
    num_requests = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_requests + 1 or block_tables.shape[0] < num_requests:
        raise ValueError(
            f"query_start_loc must have {num_requests + 1} entries and block_tables >= {num_requests} "
            f"rows, got {query_start_loc.shape[0]} and {block_tables.shape[0]}"
        )
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be contiguous along the block axis")
    if out is None:
        out = torch.empty_like(query)
    if num_requests == 0 or max_query_len <= 0:
        return out
    if config is None:
        total = num_query_tokens if num_query_tokens is not None else num_requests * max_query_len
        config = default_prefill_config(shape, query.dtype, total, sm_count(query.device))
    cfg = config
    tokens_per_tile = cfg.block_m // shape.group_size
    if tokens_per_tile < 1:
        raise ValueError(f"block_m {cfg.block_m} is smaller than the head group {shape.group_size}")
    grid = (num_requests, triton.cdiv(max_query_len, tokens_per_tile), shape.num_kv_heads)
    _prefill_kernel[grid](
        query, kv_cache, block_tables, seq_lens, query_start_loc, out, scale * LOG2_E,
        window or 0, (softcap or 1.0) * LOG2_E, out if sinks is None else sinks,  # out: a placeholder
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), BLOCK_SIZE=shape.block_size,
        GROUP=shape.group_size, BLOCK_M=cfg.block_m, TOKENS_PER_TILE=tokens_per_tile,
        HEAD_DIM=shape.head_dim, BLOCK_D=next_power_of_2(shape.head_dim), BLOCK_N=cfg.block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        WINDOWED=window is not None, SOFTCAP=softcap is not None, SINKS=sinks is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
