"""How many slices a decode request's context is split into (kernels/shapes.choose_num_splits):
from static quantities only, so that CUDA graphs replay one grid, and a power of two."""

from __future__ import annotations

import pytest

from batchlm.kernels.shapes import MAX_SPLITS, choose_num_splits, newest_rows

H200_SMS = 132


@pytest.mark.parametrize("max_context", [16, 64, 100, 784, 2048, 4096, 8192, 131072])
@pytest.mark.parametrize("batch", [1, 2, 4, 16, 64, 256])
def test_splits_fill_the_gpu_down_to_half_a_tile_each(batch: int, max_context: int) -> None:
    splits = choose_num_splits(batch, 8, max_context, H200_SMS)
    assert splits & (splits - 1) == 0 and 1 <= splits <= MAX_SPLITS
    # No split shorter than half a 64-token tile of the longest context, and no more programs than
    # four a multiprocessor (rounded up to a whole split).
    assert splits <= -(-max_context // 32)
    assert splits == 1 or (splits - 1) * batch * 8 < 4 * H200_SMS


def test_a_single_request_of_a_short_context_gets_a_program_a_multiprocessor() -> None:
    # offline_throughput.py's single stream: 512 + 256 + 16 tokens of context at most.
    assert choose_num_splits(1, 8, 784, H200_SMS) == 16
    assert choose_num_splits(1, 8, 131072, H200_SMS) == 64
    assert choose_num_splits(256, 8, 784, H200_SMS) == 1


def test_the_rows_a_decode_reads_again_after_the_write() -> None:
    # Unknown, or a tile's worth or more: the whole first tile (0); else the count itself.
    assert [newest_rows(n, 64) for n in (None, 1, 5, 63, 64, 200)] == [0, 1, 5, 63, 0, 0]
    with pytest.raises(ValueError, match="at least one token"):
        newest_rows(0, 64)
