"""Reference attention backend in plain PyTorch: the correctness oracle and the CPU production path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchlm.attention.backend import AttentionBackend, AttentionMetadata

# enable_gqa (torch >= 2.5) lets SDPA share each KV head across its query group without copies.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class TorchAttentionBackend(AttentionBackend):
    """Paged-KV attention with torch ops.

    All decode requests (one query each) run together as one padded gather and one masked SDPA call,
    in groups of at most `decode_group_size` requests to bound the padded buffer; prefill chunks run
    one request at a time through SDPA (causal, or with an offset mask over cached context). Rows past meta.num_tokens (padding a
    runner may add) are ignored and come back as zeros.
    """

    name = "torch"

    def __init__(self, decode_group_size: int = 64) -> None:
        self.decode_group_size = decode_group_size

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        num_tokens = meta.num_tokens
        write_kv_cache(kv_cache, key[:num_tokens], value[:num_tokens], meta.slot_mapping[:num_tokens])
        out = query.new_zeros(query.shape) if query.shape[0] > num_tokens else torch.empty_like(query)
        for first in range(0, meta.num_decodes, self.decode_group_size):
            last = min(first + self.decode_group_size, meta.num_decodes)
            out[first:last] = _decode_attention(query[first:last], kv_cache, meta, first, last, scale)
        for request in range(meta.num_decodes, meta.num_requests):
            start, end = meta.query_start_loc_cpu[request], meta.query_start_loc_cpu[request + 1]
            if end > start:
                out[start:end] = _prefill_attention(query, key, value, kv_cache, meta, request, scale)
        return out


def write_kv_cache(
    kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store each token's key/value at its flat slot (block_id * block_size + offset)."""
    # kv_cache[i]: [num_blocks, block_size, H_kv, D] -> flat view [num_blocks * block_size, H_kv, D]
    kv_cache[0].flatten(0, 1).index_copy_(0, slots, key.to(kv_cache.dtype))
    kv_cache[1].flatten(0, 1).index_copy_(0, slots, value.to(kv_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one request: [length, H_kv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:length]


def _decode_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, first: int, last: int, scale: float
) -> torch.Tensor:
    """One query per request for decode requests first..last-1, padded to the longest context."""
    block_size = kv_cache.shape[2]
    max_len = max(meta.seq_lens_cpu[first:last])
    tables = meta.block_tables[first:last, : -(-max_len // block_size)].long()  # [B, nb]
    # [B, nb, block_size, H_kv, D] -> [B, H_kv, L, D] (a strided view of the one gathered copy)
    keys = kv_cache[0][tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
    values = kv_cache[1][tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
    positions = torch.arange(max_len, device=query.device)
    valid = positions.unsqueeze(0) < meta.seq_lens[first:last].unsqueeze(1)  # [B, L]
    out = _sdpa(
        query.unsqueeze(2), keys.to(query.dtype), values.to(query.dtype), scale, valid[:, None, None, :]
    )
    return out.squeeze(2)  # [B, H, 1, D] -> [B, H, D]


def _prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    request: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one request's query chunk over its cached and new keys."""
    start, end = meta.query_start_loc_cpu[request], meta.query_start_loc_cpu[request + 1]
    context_len = meta.seq_lens_cpu[request]
    query_len = end - start
    if query_len == context_len:
        # Nothing cached before this chunk: attend to the new keys directly, no gather.
        keys, values = key[start:end], value[start:end]
    else:
        keys = gather_context(kv_cache[0], meta.block_tables[request], context_len)
        values = gather_context(kv_cache[1], meta.block_tables[request], context_len)
    # SDPA takes [1, H, L, D]: 3-D inputs miss its fused (flash) kernels on both CPU and GPU.
    q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
    k = keys.transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, H_kv, L, D]
    v = values.transpose(0, 1).unsqueeze(0).to(q.dtype)
    if query_len == context_len:
        out = _sdpa(q, k, v, scale, causal=True)
    else:
        # Query i sits at position context_len - query_len + i and sees keys up to there.
        rows = torch.arange(query_len, device=q.device).unsqueeze(1) + (context_len - query_len)
        allowed = torch.arange(context_len, device=q.device).unsqueeze(0) <= rows  # [q_len, L]
        out = _sdpa(q, k, v, scale, allowed)
    return out[0].transpose(0, 1)  # [q_len, H, D]


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """SDPA of [B, H, Lq, D] queries over [B, H_kv, L, D] keys/values; H_kv divides H (GQA)."""
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
