# mypy: disallow-untyped-defs=False, disallow-incomplete-defs=False, disallow-untyped-decorators=False
# mypy: disallow-untyped-calls=False, warn-return-any=False
"""Triton kernel that applies packed grammar bitmasks to logits in one launch: each program reads a run
of a constrained row's 32-bit words and writes -inf only where a bit is clear, so allowed logits are
neither read nor written and no unpacked [rows, vocab] mask is ever materialised."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Words per program: 4096 tokens, a 128k vocabulary in ~32 programs per row.
BLOCK_WORDS = 128


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr,  # [B, V] float32, bfloat16 or float16
    words_ptr,  # [R, W] int32: bit t % 32 of word t // 32 set when token t is allowed
    rows_ptr,  # [R] int64: the logits row of each bitmask row (read unless ALL_ROWS)
    stride_logits,
    stride_words,
    vocab_size,
    num_words,
    ALL_ROWS: tl.constexpr,  # bitmask row r is logits row r
    BLOCK_WORDS: tl.constexpr,
):
    index = tl.program_id(0)
    if ALL_ROWS:
        row = index.to(tl.int64)
    else:
        row = tl.load(rows_ptr + index)
    word_ids = tl.program_id(1) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    words = tl.load(
        words_ptr + index.to(tl.int64) * stride_words + word_ids, mask=word_ids < num_words, other=-1
    )
    bit_ids = tl.arange(0, 32)
    clear = ((words[:, None] >> bit_ids[None, :]) & 1) == 0  # [BLOCK_WORDS, 32]
    tokens = word_ids[:, None] * 32 + bit_ids[None, :]
    forbidden = clear & (tokens < vocab_size)
    tl.store(logits_ptr + row * stride_logits + tokens, float("-inf"), mask=forbidden)


def apply_bitmask(logits: torch.Tensor, words: torch.Tensor, rows: torch.Tensor | None) -> None:
    """Set logits[rows[r], t] = -inf wherever bit t of words[r] is clear, in place.
    logits: [B, V] float32, bfloat16 or float16; words: [R, W] int32 (W * 32 >= V); rows: [R] int64 on
    the device, or None when R == B and bitmask row r is logits row r. Other logits are left untouched."""
    assert logits.is_floating_point() and logits.stride(1) == 1  # -inf is stored in the logits' dtype
    assert words.dtype == torch.int32 and words.stride(1) == 1
    num_rows, num_words = words.shape
    assert num_words * 32 >= logits.shape[1]
    if rows is None:
        assert num_rows == logits.shape[0]
    if num_rows == 0:
        return
    grid = (num_rows, triton.cdiv(num_words, BLOCK_WORDS))
    _apply_bitmask_kernel[grid](
        logits,
        words,
        rows if rows is not None else words,
        logits.stride(0),
        words.stride(0),
        logits.shape[1],
        num_words,
        ALL_ROWS=rows is None,
        BLOCK_WORDS=BLOCK_WORDS,
    )


def warm_up(logits: torch.Tensor) -> None:
    """Compile both variants at start-up (else the first constrained step waits for them). logits:
    [1, vocab] of one dtype, laid out as the model's logits are; every bit is set, so nothing is written."""
    words = torch.full((1, triton.cdiv(logits.shape[1], 32)), -1, dtype=torch.int32, device=logits.device)
    apply_bitmask(logits, words, None)
    apply_bitmask(logits, words, torch.zeros(1, dtype=torch.int64, device=logits.device))
