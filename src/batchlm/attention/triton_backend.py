"""The GPU attention backend: our Triton kernels for the KV write, paged decode and paged prefill."""

from __future__ import annotations

import torch

from batchlm.attention.backend import AttentionBackend, AttentionMetadata
from batchlm.kernels.kv_write import write_kv_cache
from batchlm.kernels.paged_decode import DecodeConfig, paged_decode_attention
from batchlm.kernels.paged_prefill import paged_prefill_attention


class TritonAttentionBackend(AttentionBackend):
    """Decode rows (the first meta.num_decodes requests) go to the split-KV decode kernel, the rest
    to the prefill kernel. The decode path reads only device tensors and static shapes, so a runner
    may capture it in a CUDA graph (pad the batch with seq_len 0 and slot -1 rows)."""

    name = "triton"

    def __init__(self, decode_config: DecodeConfig | None = None) -> None:
        self.decode_config = decode_config or DecodeConfig()

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        write_kv_cache(key, value, kv_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        num_decodes = meta.num_decodes
        if num_decodes > 0:
            # Decodes come first, one row each: rows 0..num_decodes-1 of the batch.
            paged_decode_attention(
                query[:num_decodes],
                kv_cache,
                meta.seq_lens[:num_decodes],
                meta.block_tables[:num_decodes],
                scale,
                out=out[:num_decodes],
                config=self.decode_config,
            )
        if meta.num_requests > num_decodes:
            paged_prefill_attention(
                query,
                kv_cache,
                meta.query_start_loc[num_decodes:],
                meta.seq_lens[num_decodes:],
                meta.block_tables[num_decodes:],
                scale,
                max_query_len=meta.max_query_len,
                out=out,
                num_query_tokens=meta.num_tokens - meta.query_start_loc_cpu[num_decodes],
            )
        if query.shape[0] > meta.num_tokens:
            out[meta.num_tokens :].zero_()  # padding rows past the batch: defined, never garbage
        return out
