"""The runner's persistent host copy of each request's block table, rewritten only when it changes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from batchlm.core.step_io import ScheduledChunk


class BlockTableRows:
    """One row per request the runner knows, in a growing [rows, width] int32 array.

    A step's block-table tensor is then one numpy gather of its requests' rows instead of one list
    conversion per request. The scheduler sends the same tuple object while a request's table is
    unchanged, so a row is rewritten only when the tuple it came from is replaced (a table grows by
    one block every block_size tokens).
    """

    def __init__(self, initial_rows: int = 64, initial_width: int = 8) -> None:
        self._table = np.zeros((initial_rows, initial_width), dtype=np.int32)
        self._row_of: dict[str, int] = {}
        # The tuple each row was last written from (compared by identity).
        self._source: list[Sequence[int] | None] = [None] * initial_rows
        self._free_rows = list(range(initial_rows - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._row_of)

    def drop(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            row = self._row_of.pop(request_id, None)
            if row is not None:
                self._source[row] = None
                self._free_rows.append(row)

    def gather(self, chunks: Sequence[ScheduledChunk]) -> np.ndarray:
        """[len(chunks), widest table] int32 block tables of the chunks' requests, padded with 0."""
        width = max((len(c.block_ids) for c in chunks), default=1)
        if width > self._table.shape[1]:
            self._widen(width)
        rows = np.fromiter((self._row_for(c) for c in chunks), dtype=np.intp, count=len(chunks))
        return self._table[rows, :width]

    def _row_for(self, chunk: ScheduledChunk) -> int:
        row = self._row_of.get(chunk.request_id)
        if row is None:
            row = self._row_of[chunk.request_id] = self._take_row()
        blocks = chunk.block_ids
        if self._source[row] is not blocks:
            self._table[row, : len(blocks)] = blocks
            self._table[row, len(blocks) :] = 0
            self._source[row] = blocks
        return row

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self._table.shape[0]
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
            self._source.extend([None] * old)
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _widen(self, width: int) -> None:
        wider = np.zeros((self._table.shape[0], max(width, 2 * self._table.shape[1])), dtype=np.int32)
        wider[:, : self._table.shape[1]] = self._table
        self._table = wider
