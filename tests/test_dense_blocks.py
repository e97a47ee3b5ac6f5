"""Float weights quantized to the CPU kernels' code blocks at load (kernels/dense_blocks.py): Q8_0
against llama.cpp's rule (test_quant_blocks.py) and 4-bit blocks with a scale and an offset (as
Q4_1): codes in 0..15, each value within half a step of the weight (plus the float16 rounding of the
block's offset), chunked conversion equal to whole."""

from __future__ import annotations

import numpy as np
import pytest

from batchlm.kernels import quant_blocks
from batchlm.kernels.dense_blocks import from_dense_q4, q4_from_row_chunks
from batchlm.kernels.quant_blocks import BLOCK, dequantize


def _blocks_of(values: np.ndarray) -> np.ndarray:
    rows, cols = values.shape
    return values.reshape(rows, cols // BLOCK, BLOCK)


@pytest.mark.parametrize("offset", [0.0, 3.0, -50.0], ids=["centred", "positive", "far-negative"])
def test_4_bit_blocks_hold_each_value_within_half_a_step(offset: float) -> None:
    weight = (np.random.default_rng(1).standard_normal((7, 256)) * 0.05 + offset).astype(np.float32)
    blocks = from_dense_q4(weight)
    assert blocks.bits == 4 and blocks.codes.max() <= 15
    step = blocks.scales.astype(np.float32)[..., None]
    error = np.abs(_blocks_of(dequantize(blocks)) - _blocks_of(weight))
    # Half a step (and float32 rounding of the dequantized value).
    magnitude = np.abs(_blocks_of(weight)).max(axis=-1, keepdims=True)
    assert bool((error <= step / 2 + magnitude * 2.0**-20).all())
    # The offset and step are the block's own: no wider than its spread needs (one float16 step each).
    spread = _blocks_of(weight).max(axis=-1) - _blocks_of(weight).min(axis=-1)
    offset_slack = np.abs(_blocks_of(weight)).max(axis=-1) * 2.0**-10
    assert bool((blocks.scales.astype(np.float32) * 15 <= (spread + offset_slack) * (1 + 2.0**-9)).all())


def test_constant_and_zero_blocks_are_exact() -> None:
    weight = np.zeros((2, 64), dtype=np.float32)
    weight[1, 32:] = 0.25
    values = dequantize(from_dense_q4(weight))
    assert np.array_equal(values, weight)


def test_4_bit_blocks_in_chunks_equal_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = np.random.default_rng(2).standard_normal((37, 128)).astype(np.float32)
    whole = from_dense_q4(weight)
    monkeypatch.setattr(quant_blocks, "CHUNK_VALUES", 5 * 128)
    calls: list[tuple[int, int]] = []

    def values(start: int, stop: int) -> np.ndarray:
        calls.append((start, stop))
        return weight[start:stop]

    chunked = q4_from_row_chunks(37, 128, values)
    assert len(calls) == 8
    for ours, expected in zip(
        (chunked.codes, chunked.scales, chunked.biases),
        (whole.codes, whole.scales, whole.biases),
        strict=True,
    ):
        assert np.array_equal(ours, expected)
