"""Plain-torch references for the paged-attention kernels: slow, obvious, and the tests' ground truth."""

from __future__ import annotations

import torch


def write_kv_cache_reference(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64; -1 = padding, skipped
) -> None:
    """Write each token's key/value at its flat slot, skipping slot -1."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)  # [2, num_blocks * block_size, H_kv, D]
    slots = slot_mapping[: key.shape[0]]
    keep = slots >= 0
    flat[0, slots[keep]] = key[: slots.shape[0]][keep]
    flat[1, slots[keep]] = value[: slots.shape[0]][keep]


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, num_kv_heads, head_dim] of one request, read through its block table."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    values = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return keys, values


def causal_attention_reference(
    query: torch.Tensor,  # [L, num_heads, head_dim]: the last L positions of the context
    keys: torch.Tensor,  # [S, num_kv_heads, head_dim], S >= L
    values: torch.Tensor,  # [S, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:  # [L, num_heads, head_dim] float32
    """Softmax attention in float32; query i sits at position S - L + i and sees keys 0..S-L+i."""
    q_len, num_heads, _ = query.shape
    ctx_len = keys.shape[0]
    group = num_heads // keys.shape[1]
    out = query.new_empty(query.shape, dtype=torch.float32)
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)[:, None]
    hidden = torch.arange(ctx_len, device=query.device)[None, :] > q_pos  # [L, S]
    # One head at a time bounds memory at [L, S] floats (32k contexts).
    for head in range(num_heads):
        q = query[:, head].float()  # [L, D]
        k = keys[:, head // group].float()  # [S, D]
        v = values[:, head // group].float()
        scores = (q @ k.T) * scale  # [L, S]
        scores.masked_fill_(hidden, float("-inf"))
        out[:, head] = torch.softmax(scores, dim=-1) @ v
    return out


def paged_attention_reference(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: list[int],  # B + 1 cumulative query lengths
    seq_lens: list[int],  # B context lengths after this step (cached + new)
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq]
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim] float32; rows of requests with seq_len 0 are zeros
    """Per-request loop: gather the paged context, then causal attention of the new tokens over it."""
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for req, seq_len in enumerate(seq_lens):
        start, stop = query_start_loc[req], query_start_loc[req + 1]
        if seq_len == 0 or stop == start:
            continue
        keys, values = gather_context(kv_cache, block_tables[req], seq_len)
        out[start:stop] = causal_attention_reference(query[start:stop], keys, values, scale)
    return out
