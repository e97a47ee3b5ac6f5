"""The GPU attention backend: our Triton kernels for the KV write, paged decode and paged prefill."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from batchlm.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionSpec,
    QueryKeyRotation,
    check_sinks,
)
from batchlm.kernels.fp8_types import FP8_DTYPE
from batchlm.kernels.kv_write import rotate_and_write_kv_cache, write_kv_cache
from batchlm.kernels.paged_decode import (
    DecodeConfig,
    default_decode_config,
    paged_decode_attention,
)
from batchlm.kernels.paged_prefill import paged_prefill_attention, prefill_configs
from batchlm.kernels.shapes import check_paged_inputs, choose_num_splits, sm_count


class TritonAttentionBackend(AttentionBackend):
    """Decode rows (the first meta.num_decodes requests) go to the split-KV decode kernel, the rest
    to the prefill kernel. The decode path reads only device tensors and static shapes, so a runner
    may capture it in a CUDA graph (pad the batch with seq_len 0 and slot -1 rows).

    An FP8 KV cache holds key / k_scale and value / v_scale: k_scale joins the softmax scale and
    v_scale multiplies the output (skipped at 1.0). Each layer's scales are registered against its
    cache tensor (set_kv_scales), so the model's call stays the same for every cache dtype. A layer's
    attention sinks are raw logits: they join the softmax as they are, never times k_scale, and the
    output's v_scale leaves them as they are (they weigh no value)."""

    name = "triton"

    def __init__(self, decode_config: DecodeConfig | None = None) -> None:
        # None: each cache dtype's default (paged_decode.default_decode_config).
        self.decode_config = decode_config
        # Per-layer FP8 scales, by the cache tensor's data pointer; caches not listed use 1.0.
        self._kv_scales: dict[int, tuple[float, float]] = {}

    def set_kv_scales(self, kv_caches: list[torch.Tensor], scales: list[tuple[float, float]]) -> None:
        """(k_scale, v_scale) of each layer's FP8 cache, in layer order."""
        self._kv_scales = {cache.data_ptr(): pair for cache, pair in zip(kv_caches, scales, strict=True)}

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        spec: AttentionSpec,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        check_sinks(spec, sinks, query.shape[1])
        k_scale, v_scale = self._scales(kv_cache)
        write_kv_cache(key, value, kv_cache, meta.slot_mapping, k_scale, v_scale)
        return self._attend(query, kv_cache, meta, spec, k_scale, v_scale, sinks)

    def forward_rotating(
        self,
        positions: torch.Tensor,
        rotation: QueryKeyRotation,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        spec: AttentionSpec,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RoPE folded into the KV write (one launch a layer fewer): queries rotate in place, keys on
        their way into the cache; `key` keeps its unrotated values."""
        check_sinks(spec, sinks, query.shape[1])
        table = rotation.fusable_table(query)
        if table is None:
            return super().forward_rotating(
                positions, rotation, query, key, value, kv_cache, meta, spec, sinks
            )
        k_scale, v_scale = self._scales(kv_cache)
        rotate_and_write_kv_cache(
            positions, table, query, key, value, kv_cache, meta.slot_mapping, k_scale, v_scale
        )
        return self._attend(query, kv_cache, meta, spec, k_scale, v_scale, sinks)

    def _scales(self, kv_cache: torch.Tensor) -> tuple[float, float]:
        if kv_cache.dtype != FP8_DTYPE:
            return 1.0, 1.0
        return self._kv_scales.get(kv_cache.data_ptr(), (1.0, 1.0))

    def _attend(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        spec: AttentionSpec,
        k_scale: float,
        v_scale: float,
        sinks: torch.Tensor | None,
    ) -> torch.Tensor:
        scale = spec.scale * k_scale  # the cache holds key / k_scale
        sinks = _float32(sinks)
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
                window=spec.sliding_window,
                softcap=spec.logit_softcap,
                newest=self.newest_decode_tokens,
                sinks=sinks,
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
                window=spec.sliding_window,
                softcap=spec.logit_softcap,
                sinks=sinks,
            )
        if query.shape[0] > meta.num_tokens:
            out[meta.num_tokens :].zero_()  # padding rows past the batch: defined, never garbage
        if v_scale != 1.0:
            out.mul_(v_scale)
        return out

    @torch.inference_mode()
    def warm_up(
        self,
        kv_cache: torch.Tensor,
        num_heads: int,
        max_blocks_per_seq: int,
        specs: Sequence[AttentionSpec] = (),
        query_dtype: torch.dtype | None = None,
    ) -> None:
        """Launch each prefill tile configuration and each decode split count once on a one-token
        problem, for each kernel variant (window, soft-cap, sinks) the layers use. Which ones a step picks
        depends on its token count, batch size and context, so without this the first step to need
        one would wait for its JIT compile."""
        # Kernels specialise on whether there is a window, a cap and sinks, not on their values.
        variants = {(s.sliding_window is not None, s.logit_softcap is not None, s.sinks): s for s in specs}
        for spec in variants.values() or [AttentionSpec(1.0)]:
            self._warm_up_variant(kv_cache, num_heads, max_blocks_per_seq, spec, query_dtype)

    def _warm_up_variant(
        self,
        kv_cache: torch.Tensor,
        num_heads: int,
        max_blocks_per_seq: int,
        spec: AttentionSpec,
        query_dtype: torch.dtype | None,
    ) -> None:
        device = kv_cache.device
        dtype = query_dtype or kv_cache.dtype
        query = torch.zeros((1, num_heads, kv_cache.shape[-1]), dtype=dtype, device=device)
        shape = check_paged_inputs(query, kv_cache)
        seq_lens = torch.ones(1, dtype=torch.int32, device=device)
        block_tables = torch.zeros((1, max_blocks_per_seq), dtype=torch.int32, device=device)
        query_start_loc = torch.tensor([0, 1], dtype=torch.int32, device=device)
        # float32, as _attend passes every layer's sinks.
        sinks = torch.zeros(num_heads, dtype=torch.float32, device=device) if spec.sinks else None
        for config in prefill_configs(shape, query.dtype):
            paged_prefill_attention(
                query, kv_cache, query_start_loc, seq_lens, block_tables, 1.0, max_query_len=1, config=config,
                window=spec.sliding_window, softcap=spec.logit_softcap, sinks=sinks,
            )  # fmt: skip
        max_context = max_blocks_per_seq * shape.block_size
        programs_per_sm = (self.decode_config or default_decode_config(kv_cache.dtype)).programs_per_sm
        most_splits = choose_num_splits(1, shape.num_kv_heads, max_context, sm_count(device), programs_per_sm)
        splits = 1
        while splits <= most_splits:
            paged_decode_attention(
                query, kv_cache, seq_lens, block_tables, 1.0, num_splits=splits, config=self.decode_config,
                window=spec.sliding_window, softcap=spec.logit_softcap, sinks=sinks,
            )  # fmt: skip
            splits *= 2


def _float32(sinks: torch.Tensor | None) -> torch.Tensor | None:
    """Sinks as the kernels are compiled for them (warm_up): float32, a no-op for float32 ones; sinks
    held in the model's 16-bit dtype would otherwise compile a variant of their own mid-serving."""
    return None if sinks is None else sinks.to(torch.float32)
