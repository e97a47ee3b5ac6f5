"""The KV-cache write in one C pass (kernels/cpu_kv_write.py) stores what torch's clamp, conversion and
index_copy_ store, bit for bit, from the strided views a fused qkv projection gives."""

from __future__ import annotations

import pytest
import torch

from batchlm.kernels.cpu_kv_write import as_cached, kv_write_library, write_kv_native

needs_kernel = pytest.mark.skipif(kv_write_library() is None, reason="no AVX2 CPU or C compiler here")


def torch_write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    cache[0].flatten(0, 1).index_copy_(0, slots, as_cached(key, cache.dtype))
    cache[1].flatten(0, 1).index_copy_(0, slots, as_cached(value, cache.dtype))


def bits(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.int16 if cache.dtype == torch.float16 else torch.int32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [5, 200])  # one thread, and the parallel pass
def test_the_write_equals_torchs_from_fused_qkv_views(dtype: torch.dtype, tokens: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    heads, kv_heads, head_dim, blocks, block_size = 9, 3, 64, 40, 16
    qkv = (
        torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator) * 2e4
    )  # past half's range
    qkv[0, heads * head_dim] = float("nan")
    qkv[1, heads * head_dim + 1] = float("inf")
    key = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(blocks * block_size, generator=generator)[:tokens]
    ours = torch.zeros(2, blocks, block_size, kv_heads, head_dim, dtype=dtype)
    theirs = ours.clone()
    assert write_kv_native(ours, key, value, slots)
    torch_write(theirs, key, value, slots)
    assert torch.equal(bits(ours), bits(theirs))


@needs_kernel
def test_negative_slots_are_skipped() -> None:
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cache = torch.zeros(2, 2, 4, 2, 8)
    assert write_kv_native(cache, key, value, torch.tensor([5, -1, 2]))
    expected = torch.zeros_like(cache)
    torch_write(expected, key[[0, 2]], value[[0, 2]], torch.tensor([5, 2]))
    assert torch.equal(cache, expected)


def test_tensors_it_does_not_take_are_left_to_torch() -> None:
    cache = torch.zeros(2, 2, 4, 2, 8)
    transposed = torch.randn(2, 3, 8).transpose(0, 1)  # heads not contiguous within a token
    assert not write_kv_native(cache, transposed, transposed, torch.tensor([0, 1, 2]))
    assert not write_kv_native(
        cache, torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 2, 8), torch.arange(3)
    )
    assert not write_kv_native(
        cache[:, :, :, :, :4], torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.arange(3)
    )
    assert torch.count_nonzero(cache) == 0


@needs_kernel
def test_a_slot_past_the_cache_raises_as_torch_does() -> None:
    cache = torch.zeros(2, 2, 4, 2, 8)  # 8 slots
    with pytest.raises(IndexError, match="past the cache's 8 slots"):
        write_kv_native(cache, torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([3, 8]))
