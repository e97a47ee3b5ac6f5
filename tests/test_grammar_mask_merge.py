"""A step's grammar masks assembled from masks prefetched by request id and masks computed that step:
each batch row gets its own request's mask, in batch-row order."""

from __future__ import annotations

import numpy as np

from batchlm.runner.grammar import merge_masks, sampled_rows
from batchlm.structured.step_masks import GrammarMasks, PrefetchedMasks, SampledRows

WORDS = 3


def _mask_of(request_id: str) -> np.ndarray:
    return np.full(WORDS, sum(map(ord, request_id)), dtype=np.int32)


def _prefetched(request_ids: list[str]) -> PrefetchedMasks:
    bitmask = np.stack([_mask_of(rid) for rid in request_ids])
    return PrefetchedMasks({rid: i for i, rid in enumerate(request_ids)}, bitmask)


def _out(rows: int) -> np.ndarray:
    return np.full((rows, WORDS), -1, dtype=np.int32)


def test_the_same_sequences_in_order_use_the_prefetched_rows_as_they_are() -> None:
    ahead = _prefetched(["a", "b", "c"])
    merged = merge_masks([(0, "a"), (2, "b")], ahead, None, _out(8))
    assert merged.rows == (0, 2)
    assert np.shares_memory(merged.bitmask, ahead.bitmask)
    assert np.array_equal(merged.bitmask, np.stack([_mask_of("a"), _mask_of("b")]))


def test_reordered_and_computed_rows_are_gathered_by_request() -> None:
    ahead = _prefetched(["a", "b", "c"])
    computed = GrammarMasks((1,), np.stack([_mask_of("new")]))
    rows = [(0, "c"), (1, "new"), (3, "a")]
    merged = merge_masks(rows, ahead, computed, _out(8))
    assert merged.rows == (0, 1, 3)
    expected = np.stack([_mask_of(rid) for _, rid in rows])
    assert np.array_equal(merged.bitmask, expected)


def test_without_prefetched_masks_the_computed_ones_are_the_step_masks() -> None:
    computed = GrammarMasks((0, 4), np.stack([_mask_of("x"), _mask_of("y")]))
    assert merge_masks([(0, "x"), (4, "y")], None, computed, _out(2)) is computed


def test_sampled_rows_name_each_rows_position_in_its_sequence() -> None:
    constrained = sampled_rows([1, 3], ["b", "d"], positions=(5, 9, 2, 7))
    assert constrained == SampledRows(["b", "d"], [1, 3], [9, 7])
    assert constrained.only([1]) == SampledRows(["d"], [3], [7])
    every_row = sampled_rows([0, 1], ["a", "b"], positions=(4, 6))
    assert every_row == SampledRows(["a", "b"], [0, 1], [4, 6])
