"""Reference attention backend in plain PyTorch: the correctness oracle and the CPU production path."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchlm.attention.backend import AttentionBackend, AttentionMetadata, AttentionSpec, check_sinks
from batchlm.kernels import cpu_decode_attention
from batchlm.kernels.cpu_kv_write import as_cached, write_kv_native

# Soft-capped scores and those beside sinks are materialised: at most this many at once (64 MiB of
# float32).
SOFTCAP_SCORE_ELEMENTS = 1 << 24
# enable_gqa (torch >= 2.5) lets SDPA share each KV head across its query group without copies.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass(frozen=True)
class DecodeGroup:
    """What every layer needs to attend for decode requests first..last-1; built once per step."""

    first: int
    last: int
    # [B * nb] int64: the group's block tables, row-major, for one index_select of whole blocks.
    flat_blocks: torch.Tensor
    # Blocks per request after padding to the longest context.
    blocks_per_request: int
    # Keys per request after padding (the longest context in the group).
    max_len: int
    # [B, 1, 1, max_len] bool: True where the key is inside the request's context.
    valid: torch.Tensor
    # [B, 1, 1, max_len] int32: how many positions each key lies before the request's query.
    distance: torch.Tensor

    def mask(self, window: int | None) -> torch.Tensor:
        """Keys each query may see: its context, or the last `window` tokens of it."""
        return self.valid if window is None else self.valid & (self.distance < window)


class TorchAttentionBackend(AttentionBackend):
    """Paged-KV attention with torch ops.

    All decode requests (one query each) run together as one padded gather and one masked SDPA call,
    in groups of at most `decode_group_size` requests to bound the padded buffer; prefill chunks run
    one request at a time through SDPA (causal, or with an offset mask over cached context). Rows past
    meta.num_tokens (padding a runner may add) are ignored and come back as zeros.

    On x86-64 CPUs with AVX2 and a float32 or float16 cache, decodes instead go through our C kernel, which reads
    each request's blocks in place (kernels/cpu_decode_attention.py), from the first key of the
    layer's window (soft-capped scores and sinks included). Elsewhere, soft-capped layers and those
    with sinks compute their scores explicitly (SDPA has neither).

    Gathers copy whole blocks with index_select (a memcpy per block); advanced indexing of the cache
    costs several times more on CPU. The decode groups and the prefill chunks' masks depend only on
    the step's metadata (and a layer's window), so they are built by the first layer and reused by
    the others.
    """

    name = "torch"

    def __init__(self, decode_group_size: int = 64) -> None:
        self.decode_group_size = decode_group_size
        self._groups_meta: AttentionMetadata | None = None
        self._groups: list[DecodeGroup] = []
        self._masks_meta: AttentionMetadata | None = None
        self._masks: dict[tuple[int, int, int | None], torch.Tensor] = {}

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
        num_tokens = meta.num_tokens
        write_kv_cache(kv_cache, key[:num_tokens], value[:num_tokens], meta.slot_mapping[:num_tokens])
        out = query.new_zeros(query.shape) if query.shape[0] > num_tokens else torch.empty_like(query)
        decodes = meta.num_decodes
        native = cpu_decode_attention.supports(query, kv_cache)
        if decodes and native:
            cpu_decode_attention.paged_decode_attention(
                query[:decodes],
                kv_cache,
                meta.block_tables[:decodes],
                meta.seq_lens[:decodes],
                spec.scale,
                out[:decodes],
                spec.sliding_window,
                spec.logit_softcap,
                sinks,
            )
        else:
            for group in self._decode_groups(meta, kv_cache.shape[2]):
                out[group.first : group.last] = _decode_attention(
                    query[group.first : group.last], kv_cache, group, spec, sinks
                )
        as_decodes = decodes < meta.num_requests and native
        for request in range(meta.num_decodes, meta.num_requests):
            start, end = meta.query_start_loc_cpu[request], meta.query_start_loc_cpu[request + 1]
            if as_decodes and _short_chunk_after_context(meta, request):
                _chunk_as_decodes(query, kv_cache, meta, request, spec, sinks, out)
            elif end > start:
                mask = self._chunk_mask(meta, end - start, meta.seq_lens_cpu[request], spec.sliding_window)
                out[start:end] = _prefill_attention(
                    query, key, value, kv_cache, meta, request, spec, mask, sinks
                )
        return out

    def _chunk_mask(
        self, meta: AttentionMetadata, query_len: int, context_len: int, window: int | None
    ) -> torch.Tensor:
        """_chunk_mask's, built by the first layer that needs it in a step and reused by the others."""
        if self._masks_meta is not meta:
            self._masks.clear()
            self._masks_meta = meta
        key = (query_len, context_len, window)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = _chunk_mask(query_len, context_len, window, meta.slot_mapping.device)
        return mask

    def _decode_groups(self, meta: AttentionMetadata, block_size: int) -> list[DecodeGroup]:
        # Identity, not equality: the runner builds a new metadata object every step.
        if self._groups_meta is not meta:
            self._groups = [
                _decode_group(meta, first, min(first + self.decode_group_size, meta.num_decodes), block_size)
                for first in range(0, meta.num_decodes, self.decode_group_size)
            ]
            self._groups_meta = meta
        return self._groups


def write_kv_cache(
    kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store each token's key/value at its flat slot (block_id * block_size + offset)."""
    if write_kv_native(kv_cache, key, value, slots):  # the same values, in one pass (x86-64 CPUs)
        return
    # kv_cache[i]: [num_blocks, block_size, H_kv, D] -> flat view [num_blocks * block_size, H_kv, D]
    kv_cache[0].flatten(0, 1).index_copy_(0, slots, as_cached(key, kv_cache.dtype))
    kv_cache[1].flatten(0, 1).index_copy_(0, slots, as_cached(value, kv_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one request: [length, H_kv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table[:num_blocks].long()
    return cache.index_select(0, blocks).flatten(0, 1)[:length]


def _decode_group(meta: AttentionMetadata, first: int, last: int, block_size: int) -> DecodeGroup:
    max_len = max(meta.seq_lens_cpu[first:last])
    blocks_per_request = -(-max_len // block_size)
    tables = meta.block_tables[first:last, :blocks_per_request]  # [B, nb]
    positions = torch.arange(max_len, device=tables.device)
    # The query sits at seq_len - 1: distance 0 is itself, negative distances lie past the context.
    distance = (meta.seq_lens[first:last].unsqueeze(1) - 1 - positions.unsqueeze(0)).int()  # [B, L]
    return DecodeGroup(
        first=first,
        last=last,
        flat_blocks=tables.reshape(-1).long(),
        blocks_per_request=blocks_per_request,
        max_len=max_len,
        valid=(distance >= 0)[:, None, None, :],
        distance=distance[:, None, None, :],
    )


def _decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    group: DecodeGroup,
    spec: AttentionSpec,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One query per request of the group, over its context padded to the group's longest."""
    batch = group.last - group.first
    # [B * nb, block_size, H_kv, D] -> [B, nb * block_size, H_kv, D] -> [B, H_kv, L, D] (strided view)
    keys = kv_cache[0].index_select(0, group.flat_blocks).view(batch, -1, *kv_cache.shape[-2:])
    values = kv_cache[1].index_select(0, group.flat_blocks).view(batch, -1, *kv_cache.shape[-2:])
    keys = keys[:, : group.max_len].transpose(1, 2).to(query.dtype)
    values = values[:, : group.max_len].transpose(1, 2).to(query.dtype)
    out = _attend(query.unsqueeze(2), keys, values, spec, group.mask(spec.sliding_window), sinks)
    return out.squeeze(2)  # [B, H, 1, D] -> [B, H, D]


# Chunks of at most this many tokens after cached context run row by row through the decode kernel.
MAX_CHUNK_AS_DECODES = 16


def _short_chunk_after_context(meta: AttentionMetadata, request: int) -> bool:
    query_len = meta.query_start_loc_cpu[request + 1] - meta.query_start_loc_cpu[request]
    return 0 < query_len <= MAX_CHUNK_AS_DECODES and meta.seq_lens_cpu[request] > query_len


def _chunk_as_decodes(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    request: int,
    spec: AttentionSpec,
    sinks: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Each query row of a short chunk (a speculative verify chunk, or a prefill's short tail) attends
    as a decode at its own position, through the decode kernel: the chunk's keys are already in the
    cache, so row i sees exactly the keys up to its position, and its result is bit for bit what
    decoding that token would give (with quantized matmuls, whose int8 activations amplify the last-bit
    differences of another attention path, a verified token could otherwise differ from a decoded one)."""
    start, end = meta.query_start_loc_cpu[request], meta.query_start_loc_cpu[request + 1]
    rows, context_len = end - start, meta.seq_lens_cpu[request]
    tables = meta.block_tables[request : request + 1].expand(rows, -1)  # [rows, max_blocks], one table
    lens = torch.arange(context_len - rows + 1, context_len + 1, dtype=torch.int32)
    cpu_decode_attention.paged_decode_attention(
        query[start:end],
        kv_cache,
        tables,
        lens,
        spec.scale,
        out[start:end],
        window=spec.sliding_window,
        softcap=spec.logit_softcap,
        sinks=sinks,
    )


def _prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    request: int,
    spec: AttentionSpec,
    mask: torch.Tensor,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Causal attention of one request's query chunk over its cached and new keys (its window); `mask`
    is the chunk's _chunk_mask, used where the chunk follows cached context or the layer has a window,
    a soft-cap or sinks."""
    start, end = meta.query_start_loc_cpu[request], meta.query_start_loc_cpu[request + 1]
    context_len = meta.seq_lens_cpu[request]
    query_len = end - start
    if query_len == context_len:
        # Nothing cached before this chunk: attend to the new keys directly, no gather, as the cache
        # holds them (rounded to a 16-bit cache's dtype), so that a prompt attends alike in one chunk or
        # several, and with its prefix cached or not.
        keys, values = as_cached(key[start:end], kv_cache.dtype), as_cached(value[start:end], kv_cache.dtype)
    else:
        keys = gather_context(kv_cache[0], meta.block_tables[request], context_len)
        values = gather_context(kv_cache[1], meta.block_tables[request], context_len)
    # SDPA takes [1, H, L, D]: 3-D inputs miss its fused (flash) kernels on both CPU and GPU.
    q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
    k = keys.transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, H_kv, L, D]
    v = values.transpose(0, 1).unsqueeze(0).to(q.dtype)
    plain = spec.sliding_window is None and spec.logit_softcap is None and sinks is None
    if query_len == context_len and plain:
        out = _sdpa(q, k, v, spec.scale, causal=True)
    else:
        out = _attend(q, k, v, spec, mask, sinks)
    return out[0].transpose(0, 1)  # [q_len, H, D]


def _chunk_mask(query_len: int, context_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[q_len, L] bool: query i sits at position context_len - query_len + i and sees the keys up to
    there (only the last `window` of them on a sliding-window layer)."""
    rows = torch.arange(query_len, device=device).unsqueeze(1) + (context_len - query_len)
    distance = rows - torch.arange(context_len, device=device).unsqueeze(0)
    allowed = distance >= 0
    return allowed if window is None else allowed & (distance < window)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    mask: torch.Tensor,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked attention of [B, H, Lq, D] queries; explicit scores when the layer soft-caps them or
    has sinks, a slice of queries at a time so the score matrix stays within SOFTCAP_SCORE_ELEMENTS."""
    if spec.logit_softcap is None and sinks is None:
        return _sdpa(q, k, v, spec.scale, mask)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    rows = max(1, SOFTCAP_SCORE_ELEMENTS // (q.shape[0] * q.shape[1] * k.shape[2]))
    if q.shape[2] <= rows:
        return _explicit_attention(q, k, v, spec, mask, sinks)
    mask = mask.expand(*mask.shape[:-2], q.shape[2], mask.shape[-1])
    parts = [
        _explicit_attention(
            q[:, :, first : first + rows], k, v, spec, mask[..., first : first + rows, :], sinks
        )
        for first in range(0, q.shape[2], rows)
    ]
    return torch.cat(parts, dim=2)


def _explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    mask: torch.Tensor,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * spec.scale  # [B, H, Lq, L]
    if spec.logit_softcap is not None:
        scores = torch.tanh(scores / spec.logit_softcap) * spec.logit_softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    else:
        # The sink is one more score per head, whose probability goes to no value.
        sink_column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        with_sinks = torch.cat([scores, sink_column], dim=-1)
        probs = torch.softmax(with_sinks, dim=-1, dtype=torch.float32)[..., :-1].to(v.dtype)
    return torch.matmul(probs, v)


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
