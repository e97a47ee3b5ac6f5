"""The runner's own copy of each request's block table, kept up to date from the scheduler's appends."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from batchlm.core.step_io import ScheduledChunk


class BlockTableRows:
    """One row per request the runner knows, in a growing [rows, width] int32 array.

    Each chunk carries only the block ids appended to its request's table since the last chunk
    (ScheduledChunk.new_block_ids); they are written after the row's last block. A request the
    scheduler drops (finished, aborted or preempted) loses its row, so a preempted request starts a
    fresh one when it comes back. A step's block-table tensor is then one numpy gather of its
    requests' rows instead of one list conversion per request.
    """

    def __init__(self, initial_rows: int = 64, initial_width: int = 8) -> None:
        self._table = np.zeros((initial_rows, initial_width), dtype=np.int32)
        self._row_of: dict[str, int] = {}
        # Blocks written to each row.
        self._length = [0] * initial_rows
        self._free_rows = list(range(initial_rows - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._row_of)

    def drop(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            row = self._row_of.pop(request_id, None)
            if row is not None:
                self._table[row, : self._length[row]] = 0
                self._length[row] = 0
                self._free_rows.append(row)

    def gather(self, chunks: Sequence[ScheduledChunk]) -> np.ndarray:
        """Apply the chunks' appended block ids, then return the [len(chunks), widest table] int32
        block tables of their requests, padded with 0. Call once per step."""
        rows = np.fromiter((self._row_for(c) for c in chunks), dtype=np.intp, count=len(chunks))
        width = max((self._length[row] for row in rows.tolist()), default=0)
        return self._table[rows, : max(width, 1)]

    def _row_for(self, chunk: ScheduledChunk) -> int:
        row = self._row_of.get(chunk.request_id)
        if row is None:
            row = self._row_of[chunk.request_id] = self._take_row()
        appended = chunk.new_block_ids
        if appended:
            start = self._length[row]
            end = start + len(appended)
            if end > self._table.shape[1]:
                self._widen(end)
            self._table[row, start:end] = appended
            self._length[row] = end
        return row

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self._table.shape[0]
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
            self._length.extend([0] * old)
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _widen(self, width: int) -> None:
        wider = np.zeros((self._table.shape[0], max(width, 2 * self._table.shape[1])), dtype=np.int32)
        wider[:, : self._table.shape[1]] = self._table
        self._table = wider
