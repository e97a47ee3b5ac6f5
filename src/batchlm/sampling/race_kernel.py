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
from triton.language.extra import libdevice

# Philox counters are row * ceil(vocab / 4) + column // 4 in int32.
MAX_ELEMENTS = 2**31 - 1
# The largest float32 below 1: a uniform draw rounded up to 1.0 would give noise 0 and an infinite score.
_BELOW_ONE = tl.constexpr(0.99999994)


@triton.jit
def _challenge(row_start, cols, end, uniform, temperature, best, best_col):
    """Race columns `cols` (one per slot) against each slot's best so far; returns the new bests."""
    inside = cols < end
    logit = tl.load(row_start + cols, mask=inside, other=float("-inf")).to(tl.float32)
    # E = -log(U) ~ Exponential(1); argmax(logit - T * log E) draws from softmax(logit / T).
    # U == 0 gives E = inf: that token never wins, as an infinitely late arrival should. E needs a
    # precise log (U near 1 makes it small, and only relative accuracy keeps it so); log E only an
    # absolute error far below a float32 score's own rounding, which the hardware's fast log gives.
    uniform = tl.minimum(uniform, _BELOW_ONE)
    score = tl.where(temperature > 0, logit - temperature * libdevice.fast_logf(-tl.log(uniform)), logit)
    score = tl.where(inside, score, float("-inf"))
    better = score > best  # strict: a slot visits its columns in order and keeps its first maximum
    return tl.where(better, score, best), tl.where(better, cols, best_col)


@triton.jit(do_not_specialize=["seed"])
def _race_kernel(
    logits_ptr,
    row_stride,
    temperature_ptr,
    score_ptr,
    col_ptr,
    seed,
    vocab,
    groups_per_row,
    cols_per_split,
    BLOCK: tl.constexpr,
):
    """One (row, vocabulary split) per program: the split's best score and its first column."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    begin = split * cols_per_split
    end = tl.minimum(begin + cols_per_split, vocab)
    temperature = tl.load(temperature_ptr + row)
    row_start = logits_ptr + row.to(tl.int64) * row_stride
    # One Philox draw gives four uniforms (tl.rand would keep one and pay for all four): a tile is
    # BLOCK // 4 groups of four neighbouring columns, visited a column of each group at a time, so
    # that every thread draws only for the groups it holds.
    group = tl.arange(0, BLOCK // 4)
    best = tl.full([BLOCK // 4], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK // 4], tl.int32)
    for start in range(begin, end, BLOCK):
        # The draw's counter is the group's place in the row, so a column's noise does not depend
        # on the split count (splits start at multiples of BLOCK: start // 4 is exact).
        uniforms = tl.rand4x(seed, row * groups_per_row + start // 4 + group)
        for lane in tl.static_range(4):
            cols = start + group * 4 + lane
            best, best_col = _challenge(row_start, cols, end, uniforms[lane], temperature, best, best_col)
    top = tl.max(best, axis=0)
    winner = tl.min(tl.where(best == top, best_col, vocab), axis=0)  # the split's first maximum
    tl.store(score_ptr + row * num_splits + split, top)
    tl.store(col_ptr + row * num_splits + split, tl.where(top > float("-inf"), winner, 0))


# Enough programs to occupy every SM twice over, so that a small batch still reads at full bandwidth.
_TARGET_PROGRAMS = 264
_MAX_SPLITS = 32
_BLOCK = 2048


def race(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """Token ids [B] int64: per row, argmax(logits - T * log E) with E ~ Exponential(1) drawn from
    Philox(seed); rows with T == 0 take the plain argmax (first maximum). logits [B, V] float32,
    bfloat16 or float16 (row stride free, columns contiguous; read once, widened in registers);
    temperature [B] float32 on the same device. Small batches split each row's vocabulary over
    several programs and pick the best split afterwards."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("race() needs logits with contiguous columns")
    if rows * vocab > MAX_ELEMENTS:
        raise ValueError(f"race() handles up to {MAX_ELEMENTS} logits per call, got {rows} x {vocab}")
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    splits = max(1, min(_MAX_SPLITS, -(-_TARGET_PROGRAMS // rows), -(-vocab // _BLOCK)))
    cols_per_split = -(-vocab // (splits * _BLOCK)) * _BLOCK
    scores = torch.empty((rows, splits), dtype=torch.float32, device=logits.device)
    cols = torch.empty((rows, splits), dtype=torch.int32, device=logits.device)
    _race_kernel[(rows, splits)](
        logits,
        logits.stride(0),
        temperature,
        scores,
        cols,
        seed,
        vocab,
        -(-vocab // 4),
        cols_per_split,
        BLOCK=_BLOCK,
        num_warps=8,
    )
    if splits == 1:
        return cols.squeeze(1).long()
    # argmax takes the first best split; splits are in column order, so ties keep the first column.
    best_split = scores.argmax(dim=1, keepdim=True)  # [B, 1]
    return cols.gather(1, best_split).squeeze(1).long()
