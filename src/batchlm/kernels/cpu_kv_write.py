"""The KV-cache write of a step on x86-64 CPUs (cpu_kernels.c, see cpu_native.py): each token's keys and
values to its flat slot in one parallel pass, converted to half on the way where the cache is half.

torch's path takes a clamp, a conversion and an `index_copy_` per cache, each its own pass (and
its own wake-up of the OpenMP threads); `index_copy_` copies row by row. The kernel stores exactly
what that path stores (tests/test_cpu_kv_write.py), so tokens do not change.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from batchlm.kernels.cpu_native import probed, threads_for_rows

# The largest finite float16: a half cache saturates there (as the C kernels do), so that one outsized
# key or value gives a wrong score rather than an infinity whose NaNs would spread through the softmax.
HALF_MAX = 65504.0


def as_cached(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `cache_dtype` holds it (torch's path, and what the kernel must match)."""
    if cache_dtype == torch.float16 and x.dtype != torch.float16:
        x = x.clamp(-HALF_MAX, HALF_MAX)
    return x.to(cache_dtype)


@functools.cache
def kv_write_library() -> ctypes.CDLL | None:
    """The kernel library once its cache write agreed with torch's on a probe; None otherwise."""
    return probed("batchlm_write_kv", _write_agrees)


def write_kv_native(
    kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> bool:
    """Store key/value [T, H_kv, D] (float32) at flat slots [T] of kv_cache [2, num_blocks, block_size,
    H_kv, D] (float32 or float16), as attention/torch_backend.write_kv_cache does; False, with nothing
    written, where the kernel does not take these tensors (the caller then writes them with torch)."""
    if not _takes(kv_cache, key, value, slots):
        return False
    library = kv_write_library()
    if library is None:
        return False
    tokens = key.shape[0]
    slots = slots.to(torch.int64).contiguous()  # itself when it already is
    capacity = kv_cache.shape[1] * kv_cache.shape[2]
    outside = library.batchlm_write_kv(
        kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(),
        key.data_ptr(),
        key.stride(0),
        value.data_ptr(),
        value.stride(0),
        slots.data_ptr(),
        tokens,
        key.shape[1] * key.shape[2],
        capacity,
        kv_cache.dtype == torch.float16,
        threads_for_rows(tokens),
    )
    if outside:
        raise IndexError(f"{outside} KV-cache slot(s) past the cache's {capacity} slots")
    return True


def _takes(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> bool:
    """CPU float32 keys and values whose heads are contiguous within a token, a contiguous float32 or
    float16 cache of their shape, a whole number of 8-value vectors a token."""
    if kv_cache.device.type != "cpu" or kv_cache.dtype not in (torch.float32, torch.float16):
        return False
    if not kv_cache.is_contiguous() or kv_cache.dim() != 5 or kv_cache.shape[-2:] != key.shape[1:]:
        return False
    for x in (key, value):
        if x.dtype != torch.float32 or x.dim() != 3 or x.shape != key.shape:
            return False
        if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
            return False
    return slots.shape == (key.shape[0],) and (key.shape[1] * key.shape[2]) % 8 == 0


def _write_agrees(library: ctypes.CDLL) -> bool:
    # A float32 and a half cache, with values past half's range: each must equal torch's write, bit
    # for bit.
    generator = torch.Generator().manual_seed(0)
    key = torch.randn(6, 2, 16, generator=generator) * 3e4
    value = torch.randn(6, 2, 16, generator=generator)
    slots = torch.tensor([9, 0, 3, 14, 7, 8])
    for dtype, bits in ((torch.float32, torch.int32), (torch.float16, torch.int16)):
        ours = torch.zeros(2, 4, 4, 2, 16, dtype=dtype)
        library.batchlm_write_kv(
            ours[0].data_ptr(), ours[1].data_ptr(), key.data_ptr(), key.stride(0), value.data_ptr(),
            value.stride(0), slots.data_ptr(), 6, 32, 16, dtype == torch.float16, 2,
        )  # fmt: skip
        theirs = torch.zeros_like(ours)
        for cache, x in ((theirs[0], key), (theirs[1], value)):
            cache.flatten(0, 1).index_copy_(0, slots, as_cached(x, dtype))
        if not torch.equal(ours.view(bits), theirs.view(bits)):
            return False
    return True
