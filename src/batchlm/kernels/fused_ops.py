"""Fused Triton kernels for the small per-layer ops (RMSNorm with residual add, SiLU-and-mul, RoPE).

Unfused, each of these is 3-8 elementwise kernels; on the GPU they cost as much as the matmuls in a
decode step (tens of small launches per layer) and re-read the activations several times in a
prefill. Each kernel has a plain-torch reference beside it (the `*_reference` functions) that the GPU
tests compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.pdl import pdl_launch, pdl_prologue


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    x_stride,
    residual_stride,
    out_stride,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The residual sum is rounded to the activation dtype first, as the unfused model does.
        x = x + tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * inv_rms).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, normed * weight, mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [T, H]; returns (weight * norm(x + residual), x + residual) — the second is None without a
    residual. One read of x (and residual), one write of each output."""
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else None
    if rows == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        new_residual if new_residual is not None else out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),
        **pdl_launch(x.device),
    )
    return out, new_residual


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, (x if residual is not None else None)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * inter + cols, silu_times(gate, up), mask=mask)


@triton.jit
def silu_times(gate, up):
    """silu(gate) * up in up's dtype, rounded as the unfused model rounds (silu in fp32, rounded, then
    the product): the one-row GEMVs that take [gate | up] compute their input with it too."""
    gate = gate.to(tl.float32)
    return (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] (gate then up) -> silu(gate) * up: [T, I]."""
    rows, width = x.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
        x, out, x.stride(0), inter, BLOCK=block, **pdl_launch(x.device)
    )
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@triton.jit
def rope_cos_sin(table_ptr, position, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr):
    """The cos and sin halves of `position`'s row of a [positions, 2 * HALF] table, padded to HALF_BLOCK
    lanes (zeros past HALF), and the lanes."""
    dims = tl.arange(0, HALF_BLOCK)
    if HALF == HALF_BLOCK:
        cos = tl.load(table_ptr + position * (2 * HALF) + dims)
        sin = tl.load(table_ptr + position * (2 * HALF) + HALF + dims)
    else:
        cos = tl.load(table_ptr + position * (2 * HALF) + dims, mask=dims < HALF, other=0.0)
        sin = tl.load(table_ptr + position * (2 * HALF) + HALF + dims, mask=dims < HALF, other=0.0)
    return cos, sin, dims


@triton.jit
def _rope_kernel(
    qk_ptr,
    positions_ptr,
    cache_ptr,
    row_stride,
    head_stride,
    num_heads,
    HALF: tl.constexpr,
    HALF_BLOCK: tl.constexpr,  # HALF padded to a power of two (tl.arange needs one): 48 -> 64
    HEADS_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    position = tl.load(positions_ptr + row)
    cos, sin, offsets = rope_cos_sin(cache_ptr, position, HALF, HALF_BLOCK)
    heads = tl.arange(0, HEADS_BLOCK)
    mask = heads[:, None] < num_heads
    if HALF != HALF_BLOCK:
        mask = mask & (offsets < HALF)[None, :]
    base = qk_ptr + row * row_stride + heads[:, None] * head_stride + offsets[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    cos = cos.to(x1.dtype)[None, :]
    sin = sin.to(x1.dtype)[None, :]
    tl.store(base, x1 * cos - x2 * sin, mask=mask)
    tl.store(base + HALF, x2 * cos + x1 * sin, mask=mask)


def rotary_embedding_(positions: torch.Tensor, heads: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate in place. heads: [T, H, D] (any row stride; each head contiguous, heads evenly spaced);
    cos_sin_cache: [max_position, D] float32, cos in the first half of each row, sin in the second."""
    tokens, num_heads, head_dim = heads.shape
    if tokens == 0:
        return
    assert heads.stride(2) == 1 and cos_sin_cache.is_contiguous()
    _rope_kernel[(tokens,)](
        heads,
        positions,
        cos_sin_cache,
        heads.stride(0),
        heads.stride(1),
        num_heads,
        HALF=head_dim // 2,
        HALF_BLOCK=triton.next_power_of_2(head_dim // 2),
        HEADS_BLOCK=triton.next_power_of_2(num_heads),
        **pdl_launch(heads.device),
    )


def rotary_embedding_reference(
    positions: torch.Tensor, heads: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    cos, sin = cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    cos, sin = cos.to(heads.dtype), sin.to(heads.dtype)
    x1, x2 = heads.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
