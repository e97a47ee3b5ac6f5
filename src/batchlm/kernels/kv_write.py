"""Triton kernel that scatters new keys/values into the paged KV cache (padding slots -1 skipped).

An FP8 (e4m3) cache stores key / k_scale and value / v_scale, clamped to e4m3's range (+-448: a
value past it would become NaN, e4m3 has no infinity); the attention kernels multiply back."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.fp8_types import FP8_DTYPE, FP8_MAX
from batchlm.kernels.pdl import pdl_launch, pdl_prologue
from batchlm.kernels.shapes import check_kv_cache, next_power_of_2


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [T, KV_HEADS, HEAD_DIM]
    value_ptr,  # [T, KV_HEADS, HEAD_DIM]
    cache_ptr,  # [2, num_blocks, block_size, KV_HEADS, HEAD_DIM]
    slot_ptr,  # [T] int64
    inv_k_scale,  # 1 / k_scale (read when QUANTIZE)
    inv_v_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_kv,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    BLOCK_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    QUANTIZE: tl.constexpr,  # the cache is FP8: scale and clamp before the cast
    FP8_LIMIT: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    # Padding rows (CUDA-graph batches) carry slot -1: they own no cache slot.
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, HEAD_DIM)
        mask = (heads < KV_HEADS)[:, None]
        src_k = key_ptr + token.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :]
        src_v = value_ptr + token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :]
        dst = cache_ptr + block * stride_c_block + offset * stride_c_tok
        dst = dst + heads[:, None] * stride_c_head + dims[None, :]
        k = tl.load(src_k, mask=mask)
        v = tl.load(src_v, mask=mask)
        if QUANTIZE:
            k = tl.minimum(tl.maximum(k.to(tl.float32) * inv_k_scale, -FP8_LIMIT), FP8_LIMIT)
            v = tl.minimum(tl.maximum(v.to(tl.float32) * inv_v_scale, -FP8_LIMIT), FP8_LIMIT)
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64; -1 = padding row, nothing written
    k_scale: float = 1.0,  # FP8 cache: stored key = key / k_scale
    v_scale: float = 1.0,
) -> None:
    """Write token t's key/value at flat slot slot_mapping[t] = block_id * block_size + offset."""
    check_kv_cache(kv_cache)
    num_tokens = slot_mapping.shape[0]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    expected = (num_kv_heads, head_dim)
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dim() != 3 or tuple(tensor.shape[1:]) != expected or tensor.shape[0] < num_tokens:
            raise ValueError(
                f"{name} must be [>= {num_tokens}, {num_kv_heads}, {head_dim}], got {tuple(tensor.shape)}"
            )
        quantized = kv_cache.dtype == FP8_DTYPE
        if tensor.stride(-1) != 1 or (tensor.dtype != kv_cache.dtype and not quantized):
            raise ValueError(f"{name} must be {kv_cache.dtype} and contiguous in head_dim")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        BLOCK_SIZE=block_size,
        KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(num_kv_heads),
        QUANTIZE=kv_cache.dtype == FP8_DTYPE,
        FP8_LIMIT=FP8_MAX,
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4, **pdl_launch(key.device),
    )  # fmt: skip
