"""Triton kernel: one activation row times a 4-bit weight (kernels/int4_pack.py layout), the decode
step of a single stream.

At one row the product is bound by reading the packed words, and unpacking them costs enough
instructions to matter, so each code costs two integer and two float operations:
- a code is masked in place and OR-ed into the mantissa of 2^23 (0x4B000000), which read as a float
  is 2^23 + code * 16^p exactly; subtracting 2^23 gives the code without an int-to-float conversion
  (a slow instruction). Nibbles 0-4 sit low enough in the word; 5-7 take one shift of the word;
- the 16^p is folded into that code's activation (x / 16^p, exact), loaded once per word row;
- the zero point and scale apply once per word (8 codes): s * (sum_j code_j x_j - zero * sum_j x_j).
Programs split N (words are contiguous along N, so a [BLOCK_KW, BLOCK_N] tile reads whole rows of
BLOCK_N words) and, where N alone gives too few programs to keep enough reads in flight, K: the
splits' fp32 sums meet in a scratch buffer and the last split to finish adds them up, in the same
launch (a second launch per linear would cost about as much as the product at these sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.decode_plans import GemvConfig
from batchlm.kernels.int4_pack import CODES_PER_WORD, PackedInt4
from batchlm.kernels.w4a16_gemm import W4A16Config

# Most programs one launch splits K across (split-K partial sums meet in a scratch buffer).
MAX_SPLIT_K = 16


@triton.jit
def _add_nibble(dot, x_sum, word, x_ptr, k, k_ok, MASK: tl.constexpr, SCALE: tl.constexpr):
    """dot + code * x[k] and x_sum + x[k] for the code at MASK of every word (SCALE undoes its
    position); k, k_ok are [BLOCK_KW]."""
    x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    code = ((word & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact
    return dot + code * (x * SCALE)[:, None], x_sum + x


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,  # [K] activations
    qweight_ptr,  # [K / 8, N] int32
    scales_ptr,  # [K / g, N]
    zeros_ptr,  # [K / g, N]
    bias_ptr,  # [N] (read when HAS_BIAS)
    out_ptr,  # [N] in the activation dtype
    partial_ptr,  # [SPLIT_K, N] float32 scratch (SPLIT_K > 1)
    arrivals_ptr,  # [N tiles] int32, zero between launches (SPLIT_K > 1)
    N,
    K_WORDS: tl.constexpr,  # packed word rows, static per layer (constant loop bounds)
    WORDS_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_KW; the last split's tail is masked
    WORDS_PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
    for step in range(0, WORDS_PER_SPLIT, BLOCK_KW):
        word_rows = split * WORDS_PER_SPLIT + step + tl.arange(0, BLOCK_KW)
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
        dot = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
        x_sum = tl.zeros([BLOCK_KW], dtype=tl.float32)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k, row_ok, 0xF, 1.0)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k + 1, row_ok, 0xF0, 1.0 / 16)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k + 2, row_ok, 0xF00, 1.0 / 256)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k + 3, row_ok, 0xF000, 1.0 / 4096)
        dot, x_sum = _add_nibble(dot, x_sum, words, x_ptr, k + 4, row_ok, 0xF0000, 1.0 / 65536)
        dot, x_sum = _add_nibble(dot, x_sum, high, x_ptr, k + 5, row_ok, 0xF00, 1.0 / 256)
        dot, x_sum = _add_nibble(dot, x_sum, high, x_ptr, k + 6, row_ok, 0xF000, 1.0 / 4096)
        dot, x_sum = _add_nibble(dot, x_sum, high, x_ptr, k + 7, row_ok, 0xF0000, 1.0 / 65536)
        acc += scale * (dot - zero * x_sum[:, None])
    out = tl.sum(acc, axis=0)
    if SPLIT_K > 1:
        # Each split leaves its sum in the scratch; the last to arrive adds them up and resets the
        # tile's counter for the next launch, so no second launch (or memset) is needed.
        tl.store(partial_ptr + split * N + cols, out, mask=col_ok)
        tl.debug_barrier()  # every thread's store precedes the release below
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            out = tl.zeros([BLOCK_N], dtype=tl.float32)
            for other in tl.static_range(SPLIT_K):
                out += tl.load(partial_ptr + other * N + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
            _finish(out, bias_ptr, out_ptr, cols, col_ok, HAS_BIAS)
            tl.atomic_xchg(arrivals_ptr + tile, 0)
    else:
        _finish(out, bias_ptr, out_ptr, cols, col_ok, HAS_BIAS)


@triton.jit
def _finish(out, bias_ptr, out_ptr, cols, col_ok, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


class SplitScratch:
    """Per device: the fp32 partial sums and per-tile arrival counters every split launch shares
    (launches on one stream run one after another). Counters are back at zero after each launch, so
    they are zeroed once and CUDA graph replays reuse them; a buffer outgrown is kept alive, as a
    captured graph may still point at it."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, device: torch.device, partials: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        have = self.buffers.get(device)
        if have is not None and have[0].numel() >= partials and have[1].numel() >= tiles:
            return have
        if have is not None:
            self.outgrown.append(have)
            partials, tiles = max(partials, have[0].numel()), max(tiles, have[1].numel())
        fresh = (
            torch.empty(partials, dtype=torch.float32, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device),
        )
        self.buffers[device] = fresh
        return fresh


SCRATCH = SplitScratch()


ONE_ROW_CONFIGS = [
    GemvConfig(32, 512, 4, 2, split_k=4),
    GemvConfig(32, 512, 4, 2),
    GemvConfig(32, 256, 4, 2, split_k=8),
    GemvConfig(64, 512, 4, 2, split_k=8),
    GemvConfig(16, 512, 4, 2, split_k=4),
]


def default_gemv_config(group_size: int) -> GemvConfig:
    """Before (or without) tuning; block_k counts codes (eight per word row)."""
    del group_size  # the GEMV reads each word row's own scale: any group of whole words will do
    return ONE_ROW_CONFIGS[0]


def candidate_plans(one_row: bool, group_size: int) -> list[GemvConfig | W4A16Config]:
    """What start-up tuning times (the first: untuned): for one row this GEMV, for 2..16 rows the
    GEMM kernel with narrow tiles; for both, last, the GEMM kernel with split-K as it chose before."""
    block_k = min(128, group_size)
    # What the GEMM kernel chose for decode before (at 4096-wide layers), kept as the fallback.
    gemm_split = W4A16Config(16, 64, block_k, 4, num_warps=4, num_stages=4)
    if one_row:
        return [*ONE_ROW_CONFIGS, gemm_split]
    return [
        W4A16Config(16, 32, block_k, 1, num_warps=4, num_stages=4),
        W4A16Config(16, 16, block_k, 1, num_warps=4, num_stages=4),
        W4A16Config(16, 32, block_k, 4, num_warps=4, num_stages=4),
        gemm_split,
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
    cfg = config or default_gemv_config(packed.group_size)
    if not 1 <= cfg.split_k <= MAX_SPLIT_K:
        raise ValueError(f"split_k must be 1..{MAX_SPLIT_K}, not {cfg.split_k}")
    out_features, k_words = packed.out_features, packed.in_features // CODES_PER_WORD
    block_kw = cfg.block_k // CODES_PER_WORD
    tiles = triton.cdiv(out_features, cfg.block_n)
    out = torch.empty((1, out_features), dtype=x.dtype, device=x.device)
    partials, arrivals = (out, out)
    if cfg.split_k > 1:
        partials, arrivals = SCRATCH.get(x.device, cfg.split_k * out_features, tiles)
    _w4a16_gemv_kernel[(tiles, cfg.split_k)](
        x, packed.qweight, packed.scales, packed.zeros, out if bias is None else bias, out, partials, arrivals,
        out_features,
        K_WORDS=k_words, WORDS_PER_SPLIT=triton.cdiv(triton.cdiv(k_words, block_kw), cfg.split_k) * block_kw,
        WORDS_PER_GROUP=packed.group_size // CODES_PER_WORD, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n,
        BLOCK_KW=block_kw, SPLIT_K=cfg.split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
