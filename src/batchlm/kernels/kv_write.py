"""Triton kernels that scatter new keys/values into the paged KV cache (padding slots -1 skipped), the
second with RoPE on queries and keys folded in (one launch where RoPE and the write took two).

An FP8 (e4m3) cache stores key / k_scale and value / v_scale, clamped to e4m3's range (+-448: a
value past it would become NaN, e4m3 has no infinity); the attention kernels multiply back."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.fp8_types import FP8_DTYPE, FP8_MAX
from batchlm.kernels.fused_ops import rope_cos_sin
from batchlm.kernels.pdl import pdl_launch, pdl_prologue
from batchlm.kernels.shapes import check_kv_cache, next_power_of_2
from batchlm.kernels.specialization import unspecialized


@triton.jit
def _fp8_range(x, inverse_scale, FP8_LIMIT: tl.constexpr):
    """x / scale in float32, clamped to e4m3's finite range before the cast to the cache."""
    return tl.minimum(tl.maximum(x.to(tl.float32) * inverse_scale, -FP8_LIMIT), FP8_LIMIT)


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
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two (tl.arange needs one)
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
        dims = tl.arange(0, BLOCK_D)
        mask = (heads < KV_HEADS)[:, None]
        if HEAD_DIM != BLOCK_D:
            mask = mask & (dims < HEAD_DIM)[None, :]
        src_k = key_ptr + token.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :]
        src_v = value_ptr + token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :]
        dst = cache_ptr + block * stride_c_block + offset * stride_c_tok
        dst = dst + heads[:, None] * stride_c_head + dims[None, :]
        k = tl.load(src_k, mask=mask)
        v = tl.load(src_v, mask=mask)
        if QUANTIZE:
            k = _fp8_range(k, inv_k_scale, FP8_LIMIT)
            v = _fp8_range(v, inv_v_scale, FP8_LIMIT)
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
        BLOCK_D=next_power_of_2(head_dim),
        BLOCK_H=next_power_of_2(num_kv_heads),
        QUANTIZE=kv_cache.dtype == FP8_DTYPE,
        FP8_LIMIT=FP8_MAX,
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4, **pdl_launch(key.device),
    )  # fmt: skip


# The slot count follows the step's token count: unspecialised, so no step compiles a new variant.
@triton.jit(**unspecialized(ints=["num_slots"]))
def _rotate_write_kv_kernel(
    q_ptr,  # [T, NUM_HEADS, 2 * HALF], rotated in place
    key_ptr,  # [T, KV_HEADS, 2 * HALF], read (rotated on the way into the cache)
    value_ptr,  # [T, KV_HEADS, 2 * HALF]
    positions_ptr,  # [T]
    table_ptr,  # [max_position, 2 * HALF] float32: cos in the first half of each row, sin in the second
    cache_ptr,  # [2, num_blocks, block_size, KV_HEADS, 2 * HALF]
    slot_ptr,  # [num_slots] int64
    num_slots,
    inv_k_scale,
    inv_v_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_block, stride_c_tok, stride_c_head,
    NUM_HEADS: tl.constexpr, HEADS_BLOCK: tl.constexpr, KV_HEADS: tl.constexpr, KV_BLOCK: tl.constexpr,
    HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,  # HALF padded to a power of two (tl.arange needs one)
    BLOCK_SIZE: tl.constexpr, QUANTIZE: tl.constexpr, FP8_LIMIT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_prologue(PDL)
    row = tl.program_id(0)
    # Every load is issued before any store: the stores go where the compiler cannot rule out the
    # loads' addresses (q, k and v are views of one buffer), so a load after a store would wait
    # for it. Rows past the slots (a graph's padded queries) and padding slots (-1) own no slot.
    position = tl.load(positions_ptr + row)
    slot = tl.load(slot_ptr + row, mask=row < num_slots, other=-1).to(tl.int64)
    cos, sin, dims = rope_cos_sin(table_ptr, position, HALF, HALF_BLOCK)
    heads = tl.arange(0, HEADS_BLOCK)
    q_mask = heads[:, None] < NUM_HEADS
    if HALF != HALF_BLOCK:
        q_mask = q_mask & (dims < HALF)[None, :]
    q_base = q_ptr + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    x1 = tl.load(q_base, mask=q_mask, other=0.0)
    x2 = tl.load(q_base + HALF, mask=q_mask, other=0.0)
    kv_heads = tl.arange(0, KV_BLOCK)
    kv_mask = (kv_heads[:, None] < KV_HEADS) & (slot >= 0)
    v_mask = kv_mask  # broadcast to [KV_BLOCK, 2 * HALF_BLOCK] by the value loads
    if HALF != HALF_BLOCK:
        kv_mask = kv_mask & (dims < HALF)[None, :]
    k_base = key_ptr + row.to(tl.int64) * stride_kt + kv_heads[:, None] * stride_kh + dims[None, :]
    k1 = tl.load(k_base, mask=kv_mask, other=0.0)
    k2 = tl.load(k_base + HALF, mask=kv_mask, other=0.0)
    head_dims = tl.arange(0, 2 * HALF_BLOCK)
    if HALF != HALF_BLOCK:
        v_mask = v_mask & (head_dims < 2 * HALF)[None, :]
    v_base = value_ptr + row.to(tl.int64) * stride_vt + kv_heads[:, None] * stride_vh + head_dims[None, :]
    v = tl.load(v_base, mask=v_mask, other=0.0)
    # The same products and sums as fused_ops' RoPE kernel, so the bits match it.
    cos_h = cos.to(x1.dtype)[None, :]
    sin_h = sin.to(x1.dtype)[None, :]
    r1 = k1 * cos_h - k2 * sin_h
    r2 = k2 * cos_h + k1 * sin_h
    if QUANTIZE:
        r1 = _fp8_range(r1, inv_k_scale, FP8_LIMIT)
        r2 = _fp8_range(r2, inv_k_scale, FP8_LIMIT)
        v = _fp8_range(v, inv_v_scale, FP8_LIMIT)
    tl.store(q_base, x1 * cos_h - x2 * sin_h, mask=q_mask)
    tl.store(q_base + HALF, x2 * cos_h + x1 * sin_h, mask=q_mask)
    slot = tl.maximum(slot, 0)
    row_start = cache_ptr + (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_tok
    k_dst = row_start + kv_heads[:, None] * stride_c_head + dims[None, :]
    element = cache_ptr.dtype.element_ty
    tl.store(k_dst, r1.to(element), mask=kv_mask)
    tl.store(k_dst + HALF, r2.to(element), mask=kv_mask)
    v_dst = row_start + stride_c_kv + kv_heads[:, None] * stride_c_head + head_dims[None, :]
    tl.store(v_dst, v.to(element), mask=v_mask)


def rotate_and_write_kv_cache(
    positions: torch.Tensor,  # [T]
    cos_sin_table: torch.Tensor,  # [max_position, head_dim] float32, cos | sin per row
    query: torch.Tensor,  # [T, num_heads, head_dim], rotated in place
    key: torch.Tensor,  # [T, num_kv_heads, head_dim], left as it is
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [<= T] int64; -1 = padding row
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """RoPE ("rotate half", every dimension) on queries and keys, and the KV write, in one launch:
    fused_ops.rotary_embedding_ on both, then write_kv_cache, bit for bit, except that `key` itself
    stays unrotated (only the cache gets the rotated keys)."""
    check_kv_cache(kv_cache)
    tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    if cache_head_dim != head_dim or head_dim % 2:
        raise ValueError(f"head_dim must be even and match the cache's {cache_head_dim}, got {head_dim}")
    if cos_sin_table.shape[-1] != head_dim or not cos_sin_table.is_contiguous():
        raise ValueError("the cos/sin table must be contiguous, one head_dim-wide row per position")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.stride(-1) != 1 or tensor.shape[-1] != head_dim:
            raise ValueError(f"{name} must be contiguous in head_dim ({head_dim})")
    for name, tensor in (("key", key), ("value", value)):
        if tuple(tensor.shape) != (tokens, num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [{tokens}, {num_kv_heads}, {head_dim}], got {tuple(tensor.shape)}"
            )
    if slot_mapping.shape[0] > tokens:
        raise ValueError(f"{slot_mapping.shape[0]} slots for {tokens} query rows")
    if tokens == 0:
        return
    _rotate_write_kv_kernel[(tokens,)](
        query, key, value, positions, cos_sin_table, kv_cache, slot_mapping, slot_mapping.shape[0],
        1.0 / k_scale, 1.0 / v_scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_HEADS=num_heads, HEADS_BLOCK=next_power_of_2(num_heads),
        KV_HEADS=num_kv_heads, KV_BLOCK=next_power_of_2(num_kv_heads),
        HALF=head_dim // 2, HALF_BLOCK=next_power_of_2(head_dim // 2), BLOCK_SIZE=block_size,
        QUANTIZE=kv_cache.dtype == FP8_DTYPE, FP8_LIMIT=FP8_MAX,
        **pdl_launch(query.device),
    )  # fmt: skip
