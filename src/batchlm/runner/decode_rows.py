"""A step of decodes and verify chunks laid out as decode rows, so it can take the decode paths (the
CUDA graphs, the fused CPU decode) instead of the prefill path.

A verify chunk of 1 + k tokens at positions p .. p + k becomes 1 + k rows of one query each: row i has
position p + i, writes slot p + i, sees seq_len p + i + 1 and carries the request's block table. Every
attention backend writes all rows' keys and values into the paged cache before any row attends, so
row i sees exactly the keys up to its own position: causal, the same attention as the chunk. Every
position of a verify chunk is sampled anyway, so "logits of every row", what the decode paths return,
is what the step samples. Token ids, positions and slots do not change; only the metadata does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from batchlm.core.step_io import ScheduledChunk


def all_decode_or_verify(chunks: Sequence[ScheduledChunk]) -> bool:
    """True when some chunk verifies drafts and every chunk is a decode or a verify chunk: one sampled
    token, or the last known token plus drafts with every position sampled."""
    has_drafts = False
    for chunk in chunks:
        if not chunk.sample or len(chunk.token_ids) != 1 + chunk.num_draft_tokens:
            return False
        has_drafts = has_drafts or chunk.num_draft_tokens > 0
    return has_drafts


@dataclass(frozen=True)
class DecodeRowLayout:
    """Varlen metadata arrays of a step with one query per token row (host side, before upload)."""

    # [T + 1] int64: 0, 1, ..., T.
    query_start_loc: np.ndarray
    # [T] int64: each row's context length, its own position + 1.
    seq_lens: np.ndarray
    # [T, max_blocks] int32: each row's request's block table.
    block_tables: np.ndarray


def as_decode_rows(
    positions: np.ndarray, request_of_token: np.ndarray, block_tables: np.ndarray
) -> DecodeRowLayout:
    """One decode row per token: positions [T] int64, request_of_token [T] (index into the step's
    chunks), block_tables [B, max_blocks] int32 (one row per chunk)."""
    num_tokens = positions.shape[0]
    return DecodeRowLayout(
        query_start_loc=np.arange(num_tokens + 1, dtype=np.int64),
        seq_lens=positions + 1,
        block_tables=np.ascontiguousarray(block_tables[request_of_token]),
    )
