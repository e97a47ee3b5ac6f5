"""The compact form in which a step's SchedulerOutput travels to tensor-parallel workers.

A decode-heavy step repeats every request's whole block table, almost unchanged since the last step;
pickling those tables dominated the cost of a 256-request step. The encoder remembers the table it
last sent per request and sends only what was appended; each worker's decoder keeps the same tables
and rebuilds an equal SchedulerOutput. Chunks also travel as plain tuples, which pickle faster than
dataclasses. Encoder and decoder must see the same sequence of steps (the executor sends every step
to every worker, in order).
"""

from __future__ import annotations

import pickle
from typing import Any

from batchlm.core.step_io import ScheduledChunk, SchedulerOutput

# (request_id, token_ids, start_position, sample, blocks kept from the last table, blocks appended)
WireChunk = tuple[str, tuple[int, ...], int, bool, int, tuple[int, ...]]


class StepEncoder:
    """Executor side: SchedulerOutput -> bytes, sending block tables as appends to the last one sent."""

    def __init__(self) -> None:
        self._tables: dict[str, tuple[int, ...]] = {}

    def encode(self, scheduled: SchedulerOutput) -> bytes:
        for request_id in scheduled.finished_request_ids:
            self._tables.pop(request_id, None)
        chunks = [self._encode_chunk(chunk) for chunk in scheduled.chunks]
        message = (chunks, scheduled.new_requests, scheduled.finished_request_ids, scheduled.block_copies)
        return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)

    def _encode_chunk(self, chunk: ScheduledChunk) -> WireChunk:
        blocks = chunk.block_ids
        previous = self._tables.get(chunk.request_id, ())
        # Tables normally only grow; anything else (a preempted request's new table) is sent whole.
        kept = len(previous) if blocks[: len(previous)] == previous else 0
        self._tables[chunk.request_id] = blocks
        return (chunk.request_id, chunk.token_ids, chunk.start_position, chunk.sample, kept, blocks[kept:])

    @property
    def num_tracked(self) -> int:
        """Requests whose block table is remembered (they leave with finished_request_ids)."""
        return len(self._tables)


class StepDecoder:
    """Worker side: bytes -> the SchedulerOutput the encoder was given."""

    def __init__(self) -> None:
        self._tables: dict[str, tuple[int, ...]] = {}

    def decode(self, payload: bytes) -> SchedulerOutput:
        wire_chunks, new_requests, finished, block_copies = pickle.loads(payload)
        for request_id in finished:
            self._tables.pop(request_id, None)
        chunks = tuple(self._decode_chunk(*wire) for wire in wire_chunks)
        return SchedulerOutput(chunks, new_requests, finished, block_copies)

    def _decode_chunk(
        self, request_id: str, token_ids: Any, start: int, sample: bool, kept: int, appended: Any
    ) -> ScheduledChunk:
        previous = self._tables.get(request_id, ())
        assert len(previous) >= kept, f"step decoder lost the block table of {request_id!r}"
        blocks = previous[:kept] + appended
        self._tables[request_id] = blocks
        return ScheduledChunk(request_id, token_ids, start, blocks, sample)
