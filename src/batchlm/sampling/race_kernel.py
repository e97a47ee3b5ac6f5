"""The exponential race in one Triton pass on CUDA: noise made in registers (Philox), no [B, V] temporaries.

The torch race costs five passes over the batch's logits (draw noise, clamp, log, subtract, argmax);
at 256 rows of a 128k vocabulary that is ~1.2 GB of memory traffic per decode step. This kernel reads
each logit once. It serves rows without top-k / top-p / min-p; rows with a seed get their noise from
their own torch generator afterwards (see Sampler), so only the engine-seeded rows use its stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Philox offsets are row * vocab + column in int32.
MAX_ELEMENTS = 2**31 - 1
# The largest float32 below 1: a uniform draw rounded up to 1.0 would give noise 0 and an infinite score.
_BELOW_ONE = tl.constexpr(0.99999994)


@triton.jit(do_not_specialize=["seed"])
def _race_kernel(logits_ptr, row_stride, temperature_ptr, out_ptr, seed, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    row_start = logits_ptr + row.to(tl.int64) * row_stride
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        logit = tl.load(row_start + cols, mask=inside, other=float("-inf"))
        uniform = tl.minimum(tl.rand(seed, row * vocab + cols), _BELOW_ONE)
        # E = -log(U) ~ Exponential(1); argmax(logit - T * log E) draws from softmax(logit / T).
        # U == 0 gives E = inf: that token never wins, as an infinitely late arrival should.
        score = tl.where(temperature > 0, logit - temperature * tl.log(-tl.log(uniform)), logit)
        score = tl.where(inside, score, float("-inf"))
        better = score > best  # strict: each lane keeps its first maximum
        best = tl.where(better, score, best)
        best_col = tl.where(better, cols, best_col)
    top = tl.max(best, axis=0)
    winner = tl.min(tl.where(best == top, best_col, vocab), axis=0)  # first maximum overall
    tl.store(out_ptr + row, winner.to(tl.int64))


def race(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """Token ids [B] int64: per row, argmax(logits - T * log E) with E ~ Exponential(1) drawn from
    Philox(seed); rows with T == 0 take the plain argmax. logits [B, V] float32 (row stride free,
    columns contiguous); temperature [B] float32 on the same device."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("race() needs logits with contiguous columns")
    if rows * vocab > MAX_ELEMENTS:
        raise ValueError(f"race() handles up to {MAX_ELEMENTS} logits per call, got {rows} x {vocab}")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _race_kernel[(rows,)](
            logits, logits.stride(0), temperature, out, seed, vocab, BLOCK=2048, num_warps=8
        )
    return out
