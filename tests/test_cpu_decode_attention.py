"""The CPU decode-attention kernel (kernels/cpu_decode_attention.py) against a float64 reference over the
paged cache, and the torch backend with and without it."""

from __future__ import annotations

import math

import pytest
import torch

from batchlm.attention.backend import AttentionSpec
from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.kernels import cpu_decode_attention
from batchlm.kernels.cpu_decode_attention import decode_library, paged_decode_attention, supports
from models_harness import Chunk, build_step

needs_kernel = pytest.mark.skipif(decode_library() is None, reason="no AVX2 CPU or C compiler here")


def _paged(
    lengths: list[int],
    block_size: int,
    kv_heads: int,
    head_dim: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A cache holding each request's context in shuffled blocks, and the requests' block tables."""
    gen = torch.Generator().manual_seed(seed)
    blocks_each = [-(-length // block_size) for length in lengths]
    order = torch.randperm(sum(blocks_each) + 3, generator=gen).tolist()  # spare blocks stay unused
    cache = torch.randn(2, len(order), block_size, kv_heads, head_dim, generator=gen).to(dtype)
    tables = torch.zeros(len(lengths), max(blocks_each), dtype=torch.int32)
    taken = 0
    for row, count in enumerate(blocks_each):
        tables[row, :count] = torch.tensor(order[taken : taken + count], dtype=torch.int32)
        taken += count
    return cache, tables


def _reference(query, cache, tables, lengths, scale):
    heads, kv_heads = query.shape[1], cache.shape[3]
    out = []
    for row, length in enumerate(lengths):
        blocks = tables[row, : -(-length // cache.shape[2])].long()
        keys = cache[0, blocks].flatten(0, 1)[:length].double().repeat_interleave(heads // kv_heads, dim=1)
        values = cache[1, blocks].flatten(0, 1)[:length].double().repeat_interleave(heads // kv_heads, dim=1)
        weights = (torch.einsum("hd,lhd->hl", query[row].double(), keys) * scale).softmax(dim=-1)
        out.append(torch.einsum("hl,lhd->hd", weights, values))
    return torch.stack(out).float()


@needs_kernel
@pytest.mark.parametrize("head_dim", [8, 64, 128, 256])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_matches_reference(
    head_dim: int, heads: int, kv_heads: int, block_size: int, cache_dtype: torch.dtype
) -> None:
    # A float16 cache's values are exact in the float64 reference: the kernel must widen them exactly.
    lengths = [1, 7, 16, 17, 150, 33]
    cache, tables = _paged(lengths, block_size, kv_heads, head_dim, dtype=cache_dtype)
    query = torch.randn(len(lengths), heads, head_dim, generator=torch.Generator().manual_seed(1))
    scale = 1 / math.sqrt(head_dim)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(query, cache, tables, torch.tensor(lengths, dtype=torch.int32), scale, out)
    torch.testing.assert_close(out, _reference(query, cache, tables, lengths, scale), atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_long_context_and_large_scores(cache_dtype: torch.dtype) -> None:
    lengths = [32768, 4000]
    cache, tables = _paged(lengths, 16, 2, 64, dtype=cache_dtype)
    query = 30 * torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2))  # peaked softmax
    out = torch.empty_like(query)
    paged_decode_attention(query, cache, tables, torch.tensor(lengths, dtype=torch.int32), 0.125, out)
    torch.testing.assert_close(out, _reference(query, cache, tables, lengths, 0.125), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_strided_query_rows_and_output_rows() -> None:
    lengths = [5, 9, 2]
    cache, tables = _paged(lengths, 4, 2, 16)
    fused = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(3))  # [q | k | v] heads per row
    query = fused[:, :6]  # rows 160 floats apart, heads contiguous
    out = torch.zeros(5, 6, 16)[:3]
    paged_decode_attention(query, cache, tables, torch.tensor(lengths, dtype=torch.int32), 0.3, out)
    torch.testing.assert_close(out, _reference(query, cache, tables, lengths, 0.3), atol=2e-5, rtol=1e-4)


@needs_kernel
def test_empty_context_gives_zeros_and_empty_batch_is_a_no_op() -> None:
    cache, tables = _paged([4], 4, 1, 8)
    query = torch.randn(1, 2, 8)
    out = torch.full_like(query, 5.0)
    paged_decode_attention(query, cache, tables, torch.tensor([0], dtype=torch.int32), 1.0, out)
    assert torch.count_nonzero(out) == 0
    paged_decode_attention(query[:0], cache, tables[:0], torch.zeros(0, dtype=torch.int32), 1.0, out[:0])


def test_supports_float32_queries_over_float32_or_float16_caches_with_head_dim_a_multiple_of_8() -> None:
    cache = torch.zeros(2, 3, 4, 1, 12)
    assert not supports(torch.zeros(1, 2, 12), cache)
    assert not supports(torch.zeros(1, 2, 16, dtype=torch.bfloat16), torch.zeros(2, 3, 4, 1, 16))
    assert not supports(torch.zeros(1, 2, 16), torch.zeros(2, 3, 4, 1, 16, dtype=torch.bfloat16))
    assert not supports(torch.zeros(1, 2, 16), torch.zeros(2, 3, 4, 1, 32)[..., :16])  # not contiguous
    if decode_library() is not None:
        assert supports(torch.zeros(1, 2, 16), torch.zeros(2, 3, 4, 1, 16, dtype=torch.float16))


@needs_kernel
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_backend_gives_the_same_outputs_with_and_without_the_kernel(
    monkeypatch: pytest.MonkeyPatch, cache_dtype: torch.dtype
) -> None:
    block = 4
    chunks = [Chunk([0], start, [i * 5 + j for j in range(5)]) for i, start in enumerate([1, 11, 5, 19, 3])]
    chunks.append(Chunk([0] * 6, 4, [30, 31, 32]))  # a prefill chunk over cached context after them
    _, _, meta = build_step(chunks, block)
    gen = torch.Generator().manual_seed(4)
    cache = torch.randn(2, 40, block, 2, 64, generator=gen).to(cache_dtype)
    query = torch.randn(meta.num_tokens, 6, 64, generator=gen)
    key = torch.randn(meta.num_tokens, 2, 64, generator=gen)
    value = torch.randn(meta.num_tokens, 2, 64, generator=gen)
    with_kernel = TorchAttentionBackend().forward(
        query, key, value, cache.clone(), meta, AttentionSpec(0.125)
    )
    monkeypatch.setattr(cpu_decode_attention, "supports", lambda query, kv_cache: False)
    without = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, AttentionSpec(0.125))
    torch.testing.assert_close(with_kernel, without, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_a_half_cache_saturates_outsized_keys_and_values_alike_on_both_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A key or value past float16's range is stored as +-65504 (not infinity, whose NaNs would spread
    # through the softmax), by torch's write and read alike with and without the kernel.
    block = 4
    chunks = [Chunk([0], start, [i * 5 + j for j in range(5)]) for i, start in enumerate([1, 11, 5])]
    _, _, meta = build_step(chunks, block)
    gen = torch.Generator().manual_seed(6)
    cache = torch.randn(2, 20, block, 2, 64, generator=gen).half()
    query = torch.randn(meta.num_tokens, 6, 64, generator=gen) * 1e-4
    key = torch.randn(meta.num_tokens, 2, 64, generator=gen)
    value = torch.randn(meta.num_tokens, 2, 64, generator=gen)
    key[0, 0, :4] = torch.tensor([1e6, -1e6, 7e4, -7e4])
    value[1, 1, :2] = torch.tensor([1e9, -1e9])
    caches = [cache.clone(), cache.clone()]
    with_kernel = TorchAttentionBackend().forward(query, key, value, caches[0], meta, AttentionSpec(0.125))
    monkeypatch.setattr(cpu_decode_attention, "supports", lambda query, kv_cache: False)
    without = TorchAttentionBackend().forward(query, key, value, caches[1], meta, AttentionSpec(0.125))
    assert torch.isfinite(with_kernel).all()
    torch.testing.assert_close(with_kernel, without, atol=2e-5, rtol=1e-4)
    stored_key = caches[0][0].flatten(0, 1)[meta.slot_mapping[0], 0, :4]
    assert stored_key.tolist() == [65504.0, -65504.0, 65504.0, -65504.0]
    assert caches[0][1].flatten(0, 1)[meta.slot_mapping[1], 1, :2].tolist() == [65504.0, -65504.0]
