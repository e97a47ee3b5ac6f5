"""Triton kernel: one activation row times a 4-bit weight (kernels/int4_pack.py layout), the decode
step of a single stream.

At one row the product is bound by reading the packed words, and unpacking them costs enough
instructions to matter, so each code costs two integer and two float operations:
- a code is masked in place and OR-ed into the mantissa of 2^23 (0x4B000000), which read as a float
  is 2^23 + code * 16^p exactly; subtracting 2^23 gives the code without an int-to-float conversion
  (a slow instruction). Nibbles 0-4 sit low enough in the word; 5-7 take one shift of the word;
- the 16^p is folded into that code's activation (x / 16^p, exact), loaded once per word row;
- the zero point and scale apply once per word (8 codes): s * (sum_j code_j x_j - zero * sum_j x_j).
Programs split N: words are contiguous along N, so a [BLOCK_KW, BLOCK_N] tile reads whole rows of
BLOCK_N words, and narrow N tiles make enough programs to fill the GPU without a split-K reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.decode_plans import GemvConfig
from batchlm.kernels.int4_pack import CODES_PER_WORD, PackedInt4
from batchlm.kernels.w4a16_gemm import W4A16Config

TWO_POW_23 = 8388608.0
TWO_POW_23_BITS = 0x4B000000  # the float 2^23: exponent set, mantissa zero


@triton.jit
def _nibble_times_x(word, x_ptr, k, k_ok, MASK: tl.constexpr, SCALE: tl.constexpr):
    """(code at MASK, shifted down) * x[k], for every word of the tile; k, k_ok are [BLOCK_KW]."""
    x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    magic = ((word & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return magic * (x * SCALE)[:, None], x


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,  # [K] activations
    qweight_ptr,  # [K / 8, N] int32
    scales_ptr,  # [K / g, N]
    zeros_ptr,  # [K / g, N]
    bias_ptr,  # [N] (read when HAS_BIAS)
    out_ptr,  # [N] in the activation dtype
    N,
    K_WORDS: tl.constexpr,  # packed word rows, static per layer (constant loop bounds)
    WORDS_PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
    for w0 in range(0, K_WORDS, BLOCK_KW):
        word_rows = w0 + tl.arange(0, BLOCK_KW)
        row_ok = word_rows < K_WORDS
        tile_ok = row_ok[:, None] & col_ok[None, :]
        words = tl.load(
            qweight_ptr + word_rows.to(tl.int64)[:, None] * N + cols[None, :], mask=tile_ok, other=0
        )
        at_group = (word_rows // WORDS_PER_GROUP).to(tl.int64)[:, None] * N + cols[None, :]
        scale = tl.load(scales_ptr + at_group, mask=tile_ok, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + at_group, mask=tile_ok, other=0.0).to(tl.float32)
        k = word_rows * 8
        high = words >> 12  # nibbles 5-7 moved to bits 8-19, below the float's exponent
        dot, x_sum = _nibble_times_x(words, x_ptr, k, row_ok, 0xF, 1.0)
        part, x = _nibble_times_x(words, x_ptr, k + 1, row_ok, 0xF0, 1.0 / 16)
        dot, x_sum = dot + part, x_sum + x
        part, x = _nibble_times_x(words, x_ptr, k + 2, row_ok, 0xF00, 1.0 / 256)
        dot, x_sum = dot + part, x_sum + x
        part, x = _nibble_times_x(words, x_ptr, k + 3, row_ok, 0xF000, 1.0 / 4096)
        dot, x_sum = dot + part, x_sum + x
        part, x = _nibble_times_x(words, x_ptr, k + 4, row_ok, 0xF0000, 1.0 / 65536)
        dot, x_sum = dot + part, x_sum + x
        part, x = _nibble_times_x(high, x_ptr, k + 5, row_ok, 0xF00, 1.0 / 256)
        dot, x_sum = dot + part, x_sum + x
        part, x = _nibble_times_x(high, x_ptr, k + 6, row_ok, 0xF000, 1.0 / 4096)
        dot, x_sum = dot + part, x_sum + x
        part, x = _nibble_times_x(high, x_ptr, k + 7, row_ok, 0xF0000, 1.0 / 65536)
        dot, x_sum = dot + part, x_sum + x
        acc += scale * (dot - zero * x_sum[:, None])
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def candidate_plans(one_row: bool, group_size: int) -> list[GemvConfig | W4A16Config]:
    """What start-up tuning times (the first: untuned): for one row this GEMV (block_k counts codes,
    eight per word row), for 2..16 rows the GEMM kernel with narrow tiles, and split-K as it was."""
    if one_row:
        return [
            GemvConfig(32, 512, 4, 2),
            GemvConfig(16, 512, 4, 2),
            GemvConfig(64, 256, 4, 2),
            GemvConfig(32, 1024, 8, 2),
        ]
    block_k = min(128, group_size)
    return [
        W4A16Config(16, 32, block_k, 1, num_warps=4, num_stages=4),
        W4A16Config(16, 16, block_k, 1, num_warps=4, num_stages=4),
        W4A16Config(16, 64, block_k, 4, num_warps=4, num_stages=4),
    ]


def w4a16_gemv(
    x: torch.Tensor,  # [1, K] contiguous
    packed: PackedInt4,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """[1, N] in x's dtype: x W^T + bias, accumulated in fp32."""
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != packed.in_features or not x.is_contiguous():
        raise ValueError(f"x must be [1, {packed.in_features}] and contiguous, got {tuple(x.shape)}")
    if packed.group_size % CODES_PER_WORD:
        raise ValueError(f"groups of {packed.group_size} inputs do not hold whole packed words")
    cfg = config or GemvConfig(32, 512, 4, 2)
    out = torch.empty((1, packed.out_features), dtype=x.dtype, device=x.device)
    _w4a16_gemv_kernel[(triton.cdiv(packed.out_features, cfg.block_n),)](
        x, packed.qweight, packed.scales, packed.zeros, out if bias is None else bias, out,
        packed.out_features,
        K_WORDS=packed.in_features // CODES_PER_WORD, WORDS_PER_GROUP=packed.group_size // CODES_PER_WORD, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_k // CODES_PER_WORD,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
