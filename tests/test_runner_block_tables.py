"""BlockTableRows: the runner's persistent per-request block-table rows, built from the block ids each
chunk appends, and the per-step gather."""

from __future__ import annotations

import numpy as np

from batchlm.core.step_io import ScheduledChunk
from batchlm.runner.block_tables import BlockTableRows


def _chunk(request_id: str, appended: tuple[int, ...] = ()) -> ScheduledChunk:
    return ScheduledChunk(request_id, (5,), 0, appended, True)


def test_gather_pads_to_the_widest_table_in_step_order() -> None:
    rows = BlockTableRows()
    table = rows.gather([_chunk("a", (3, 9)), _chunk("b", (4,)), _chunk("c", (7, 8, 1))])
    assert table.dtype == np.int32
    assert table.tolist() == [[3, 9, 0], [4, 0, 0], [7, 8, 1]]
    # Another step: other order, a subset, nothing appended; each request keeps its own row.
    assert rows.gather([_chunk("b"), _chunk("a")]).tolist() == [[4, 0], [3, 9]]


def test_appended_blocks_extend_the_row_and_a_dropped_request_starts_over() -> None:
    rows = BlockTableRows()
    rows.gather([_chunk("a", (3, 9, 2))])
    assert rows.gather([_chunk("a", (6,))]).tolist() == [[3, 9, 2, 6]]
    # Preempted: the scheduler drops it, and it comes back with a shorter, different table; no stale
    # blocks.
    rows.drop(["a"])
    assert rows.gather([_chunk("a", (11,)), _chunk("z", (1, 1, 1, 1))]).tolist() == [
        [11, 0, 0, 0],
        [1, 1, 1, 1],
    ]


def test_the_gathered_array_is_a_copy() -> None:
    rows = BlockTableRows()
    table = rows.gather([_chunk("a", (3, 9))])
    table[0, 0] = 100
    assert rows.gather([_chunk("a")]).tolist() == [[3, 9]]


def test_dropped_rows_are_reused_clean() -> None:
    rows = BlockTableRows(initial_rows=2, initial_width=2)
    rows.gather([_chunk("a", (1, 2)), _chunk("b", (3, 4))])
    rows.drop(["a", "unknown"])
    assert len(rows) == 1
    assert rows.gather([_chunk("c", (5,)), _chunk("b")]).tolist() == [[5, 0], [3, 4]]


def test_rows_and_width_grow_on_demand() -> None:
    rows = BlockTableRows(initial_rows=2, initial_width=2)
    chunks = [_chunk(f"r{i}", tuple(range(i, i + 1 + i))) for i in range(5)]
    table = rows.gather(chunks)
    assert len(rows) == 5
    for i, row in enumerate(table.tolist()):
        assert row == [*range(i, 2 * i + 1), *[0] * (5 - (i + 1))]


def test_appends_past_the_width_widen_the_table_and_keep_the_other_rows() -> None:
    rows = BlockTableRows(initial_rows=2, initial_width=2)
    rows.gather([_chunk("a", (1, 2)), _chunk("b", (3,))])
    table = rows.gather([_chunk("a", (4, 5, 6)), _chunk("b", (7,))])
    assert table.tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
