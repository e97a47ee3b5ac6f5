"""Float weights quantized to the CPU kernels' per-32 code blocks (quant_blocks.CodeBlocks) as they
load: Q8_0 (--quantization int8 and fp8 on a CPU, and any weight the kernels read in no other form)
and 4-bit blocks with a scale and an offset each, as llama.cpp's Q4_1 (--quantization w4a16 on a
CPU). Rows are taken CHUNK_VALUES at a time: a chunk's intermediate arrays stay in cache, where a
whole embedding's would each stream through memory (BENCHMARKS.md), and a weight that is not float
(quantized, half) is never widened whole. Pure numpy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from batchlm.kernels import quant_blocks
from batchlm.kernels.quant_blocks import BLOCK, ChunkMap, CodeBlocks, scaled_halves, serial_chunks

# A chunk's codes, scales and biases.
Coded = tuple[np.ndarray, np.ndarray, np.ndarray]


def from_dense_q8(weight: np.ndarray) -> CodeBlocks:
    """Q8_0 quantization of a float [rows, cols] weight (cols a multiple of 32), as llama.cpp does it:
    per block d = max |w| / 127, codes round(w / d) (halves away from zero) + 128, scale float16(d)."""
    rows, cols = weight.shape
    return q8_from_row_chunks(rows, cols, lambda start, stop: weight[start:stop])


def q8_from_row_chunks(
    rows: int, cols: int, values: Callable[[int, int], np.ndarray], chunks: ChunkMap = serial_chunks
) -> CodeBlocks:
    """from_dense_q8 of the [rows, cols] weight whose rows [start, stop) `values(start, stop)` gives.
    `chunks` runs the chunks (in parallel: each chunk's values and codes are its own, so the result is
    the same)."""
    return _from_row_chunks(rows, cols, values, _q8_codes, 8, chunks)


def from_dense_q4(weight: np.ndarray) -> CodeBlocks:
    """4-bit blocks of a float [rows, cols] weight (cols a multiple of 32), as llama.cpp's Q4_1: per
    block an offset m and a step d, both float16, codes round((w - m) / d) in 0..15. m is min w
    rounded down and d (max w - m) / 15 rounded up to float16, so every value lies within the 16
    levels and within half a step of one (a block far from zero keeps that bound, though its float16
    offset may leave its lowest codes unused)."""
    rows, cols = weight.shape
    return q4_from_row_chunks(rows, cols, lambda start, stop: weight[start:stop])


def q4_from_row_chunks(
    rows: int, cols: int, values: Callable[[int, int], np.ndarray], chunks: ChunkMap = serial_chunks
) -> CodeBlocks:
    """from_dense_q4 of the weight whose rows [start, stop) `values(start, stop)` gives."""
    return _from_row_chunks(rows, cols, values, _q4_codes, 4, chunks)


def q8_biases(scales: np.ndarray) -> np.ndarray:
    """The biases of Q8_0 blocks with these scales: their codes are stored plus 128."""
    return scaled_halves(scales, -128.0)


def _from_row_chunks(
    rows: int,
    cols: int,
    values: Callable[[int, int], np.ndarray],
    code: Callable[[np.ndarray], Coded],
    bits: int,
    chunks: ChunkMap,
) -> CodeBlocks:
    codes = np.empty((rows, cols), dtype=np.uint8)
    scales = np.empty((rows, cols // BLOCK), dtype=np.float16)
    biases = np.empty((rows, cols // BLOCK), dtype=np.float16)

    def consume(start: int, stop: int, coded: Coded) -> None:
        codes[start:stop], scales[start:stop], biases[start:stop] = coded

    step = max(1, quant_blocks.CHUNK_VALUES // max(cols, 1))
    chunks(rows, step, lambda start, stop: code(values(start, stop)), consume)
    return CodeBlocks(codes, scales, biases, bits)


def _q8_codes(weight: np.ndarray) -> Coded:
    rows, cols = weight.shape
    blocks = weight.astype(np.float32).reshape(rows, cols // BLOCK, BLOCK)
    d = (np.abs(blocks).max(axis=-1, keepdims=True) / 127).astype(np.float32)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    scaled = blocks * inverse
    codes = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5) + 128
    scales = d[..., 0].astype(np.float16)
    return codes.astype(np.uint8).reshape(rows, cols), scales, q8_biases(scales)


def _q4_codes(weight: np.ndarray) -> Coded:
    rows, cols = weight.shape
    blocks = weight.astype(np.float32).reshape(rows, cols // BLOCK, BLOCK)
    lowest = blocks.min(axis=-1, keepdims=True)
    low = _half_rounded(lowest, up=False)
    span = blocks.max(axis=-1, keepdims=True) - low.astype(np.float32)
    d = _half_rounded(span / 15, up=True)
    step = d.astype(np.float32)
    inverse = np.divide(np.float32(1), step, out=np.zeros_like(step), where=step > 0)
    codes = np.clip(np.floor((blocks - low.astype(np.float32)) * inverse + 0.5), 0, 15)
    return codes.astype(np.uint8).reshape(rows, cols), d[..., 0], low[..., 0]


def _half_rounded(values: np.ndarray, up: bool) -> np.ndarray:
    """float32 `values` rounded up (or down) to float16: the nearest float16, moved one step where it
    fell on the other side."""
    halves = values.astype(np.float16)
    widened = halves.astype(np.float32)
    if up:
        return np.where(widened < values, np.nextafter(halves, np.float16(np.inf)), halves)
    return np.where(widened > values, np.nextafter(halves, np.float16(-np.inf)), halves)
