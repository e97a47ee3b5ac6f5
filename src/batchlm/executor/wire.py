"""The compact form in which a step's SchedulerOutput travels to tensor-parallel workers.

Chunks travel as plain tuples, which pickle faster than dataclasses. Block tables need no encoding of
their own: a chunk carries only the block ids appended since the request's last chunk, and each
worker's runner keeps the tables (as a single runner does), so a steady decode step sends no block
ids at all. The encoding holds no state; the executor sends every step to every worker, in order.
"""

from __future__ import annotations

import pickle

from batchlm.core.step_io import NewRequestData, ScheduledChunk, SchedulerOutput

# (request_id, token_ids, start_position, new_block_ids, sample)
WireChunk = tuple[str, tuple[int, ...], int, tuple[int, ...], bool]
WireStep = tuple[list[WireChunk], tuple[NewRequestData, ...], frozenset[str], tuple[tuple[int, int], ...]]


def encode_step(scheduled: SchedulerOutput) -> bytes:
    """Executor side: SchedulerOutput -> bytes."""
    chunks = [
        (chunk.request_id, chunk.token_ids, chunk.start_position, chunk.new_block_ids, chunk.sample)
        for chunk in scheduled.chunks
    ]
    message: WireStep = (
        chunks,
        scheduled.new_requests,
        scheduled.finished_request_ids,
        scheduled.block_copies,
    )
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode_step(payload: bytes) -> SchedulerOutput:
    """Worker side: bytes -> the SchedulerOutput encode_step was given."""
    message: WireStep = pickle.loads(payload)
    wire_chunks, new_requests, finished, block_copies = message
    chunks = tuple(ScheduledChunk(*wire) for wire in wire_chunks)
    return SchedulerOutput(chunks, new_requests, finished, block_copies)
