"""The gguf package's reference dequantization run in row chunks on a thread pool
(layers/quantization/reference_rows.py): the same bytes as the whole tensor decoded at once, on
every path that reads it (dense values, Q8_0 code blocks for the quantized CPU kernels), with the
pool really used and never more than a few chunks decoded ahead of their consumer."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from batchlm.kernels import dense_blocks, quant_blocks
from batchlm.kernels.cpu_quant import quant_library
from batchlm.layers.quantization import reference_rows, registry
from batchlm.layers.quantization.base import QuantizedTensor, columns_of
from batchlm.layers.quantization.cpu_quantized import code_blocks
from batchlm.models import gguf_progress
from batchlm.models.gguf_file import iter_gguf_tensors, open_gguf
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.gguf_progress import with_progress
from batchlm.models.gguf_types import REFERENCE_TYPES
from batchlm.models.loader import load_model
from gguf_builder import random_blocks, write_tiny_gguf
from models_harness import Chunk, make_kv_caches, run_step

# Reference-only types, and two the kernels read (the dense path decodes those the same way).
TYPES = ["Q2_K", "IQ1_M", "IQ2_XXS", "IQ2_S", "IQ3_S", "TQ1_0", "TQ2_0", "Q4_K", "IQ4_XS"]
ROWS = 23  # chunks of 5 rows: four whole ones and a short last one
CHUNK_ROWS = 5


class RecordingPool(ThreadPoolExecutor):
    """A thread pool that counts the chunks handed to it and the most ever unfinished at once."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers, thread_name_prefix="test-dequantize")
        self.workers = workers
        self.submitted = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def run() -> Any:
            with self._lock:
                self.threads.add(threading.current_thread().name)
            return fn(*args, **kwargs)

        self.submitted += 1
        return super().submit(run)


@pytest.fixture
def pools(monkeypatch: pytest.MonkeyPatch) -> list[RecordingPool]:
    made: list[RecordingPool] = []

    def make(workers: int) -> RecordingPool:
        made.append(RecordingPool(workers))
        return made[-1]

    monkeypatch.setattr(reference_rows, "make_executor", make)
    monkeypatch.setattr(reference_rows, "conversion_threads", lambda: 3)
    return made


def _tensor(qtype: str, rows: int = ROWS, blocks_per_row: int = 2, seed: int = 0) -> QuantizedTensor:
    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    cols = blocks_per_row * block_size
    data = random_blocks((rows, cols), qtype, np.random.default_rng(seed))
    return QuantizedTensor(qtype, torch.from_numpy(data), cols, block_size, block_bytes)


def _small_chunks(monkeypatch: pytest.MonkeyPatch, cols: int) -> None:
    monkeypatch.setattr(quant_blocks, "CHUNK_VALUES", CHUNK_ROWS * cols)


def _whole(tensor: QuantizedTensor) -> np.ndarray:
    """The values as the whole tensor decoded in one call (what loading did before chunks)."""
    values = gguf_dequantize(tensor.data.contiguous().numpy(), GGMLQuantizationType[tensor.qtype])
    return values.reshape(tuple(tensor.shape))


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32).numpy()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_values_are_the_whole_tensors_bit_for_bit(
    qtype: str, dtype: torch.dtype, pools: list[RecordingPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    tensor = _tensor(qtype)
    _small_chunks(monkeypatch, tensor.cols)
    expected = torch.from_numpy(_whole(tensor)).to(dtype)
    got = tensor.dequantize(dtype)
    assert got.dtype == dtype and got.shape == expected.shape
    np.testing.assert_array_equal(_bits(got), _bits(expected))
    assert [pool.submitted for pool in pools] == [-(-ROWS // CHUNK_ROWS)]


@pytest.mark.parametrize("qtype", ["Q2_K", "IQ2_XXS", "IQ3_XXS", "IQ1_S", "TQ1_0", "TQ2_0"])
def test_q8_code_blocks_are_the_serial_conversions(
    qtype: str, pools: list[RecordingPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    tensor = _tensor(qtype, blocks_per_row=1)
    _small_chunks(monkeypatch, tensor.cols)
    values = _whole(tensor)
    expected = dense_blocks.q8_from_row_chunks(ROWS, tensor.cols, lambda start, stop: values[start:stop])
    got = code_blocks(tensor)
    for field in ("codes", "scales", "biases"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    assert got.bits == expected.bits == 8
    assert [pool.submitted for pool in pools] == [-(-ROWS // CHUNK_ROWS)]


def test_a_column_window_inside_blocks_reads_the_same_values(
    pools: list[RecordingPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A row-parallel share inside Q2_K's 256-value blocks: the covering blocks, decoded in chunks.
    tensor = _tensor("Q2_K", blocks_per_row=2)
    _small_chunks(monkeypatch, tensor.cols)
    window = columns_of(tensor, 96, 320)
    np.testing.assert_array_equal(window.dequantize().numpy(), _whole(tensor)[:, 96:416])
    assert pools and all(pool.submitted == -(-ROWS // CHUNK_ROWS) for pool in pools)


def test_the_chunks_run_on_the_pool_threads(
    pools: list[RecordingPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    tensor = _tensor("IQ2_XXS", rows=40)
    _small_chunks(monkeypatch, tensor.cols)
    tensor.dequantize()
    code_blocks(tensor)
    assert len(pools) == 2
    for pool in pools:
        assert pool.workers == 3 and pool.submitted == 8
        assert pool.threads and all(name.startswith("test-dequantize") for name in pool.threads)


def test_few_chunks_are_ahead_of_their_consumer(pools: list[RecordingPool]) -> None:
    ahead: list[int] = []
    consumed: list[int] = []

    def consume(start: int, stop: int, result: int) -> None:
        ahead.append(pools[0].submitted - len(consumed))
        consumed.append(result)

    reference_rows.map_row_chunks(100, 3, lambda start, stop: start, consume)
    assert consumed == list(range(0, 100, 3))  # every chunk, in row order
    assert pools[0].workers == 3
    assert max(ahead) <= reference_rows.IN_FLIGHT * 3


def test_a_failing_chunk_raises_and_leaves_no_thread(pools: list[RecordingPool]) -> None:
    def produce(start: int, stop: int) -> int:
        if start == 30:
            raise ValueError("bad block")
        return start

    with pytest.raises(ValueError, match="bad block"):
        reference_rows.map_row_chunks(100, 3, produce, lambda start, stop, result: None)
    assert not any(t.name.startswith("test-dequantize") for t in threading.enumerate())


def test_one_thread_or_one_chunk_runs_inline(pools: list[RecordingPool]) -> None:
    seen: list[tuple[int, int]] = []
    reference_rows.map_row_chunks(10, 3, lambda a, b: (a, b), lambda a, b, r: seen.append(r), threads=1)
    reference_rows.map_row_chunks(3, 3, lambda a, b: (a, b), lambda a, b, r: seen.append(r))
    assert seen == [(0, 3), (3, 6), (6, 9), (9, 10), (0, 3)]
    assert not pools


def test_the_threads_are_the_engines_cpu_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)  # BATCHLM_CORE_THREADS=6, or a TP rank's share
    assert reference_rows.conversion_threads() == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))  # torch counted the host's cores
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)
    assert reference_rows.conversion_threads() == 4


def test_the_load_announcement_names_the_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "IQ2_XXS")
    reader = open_gguf(gguf_path)
    monkeypatch.setattr(gguf_progress, "ANNOUNCED_BYTES", 0)
    monkeypatch.setattr(reference_rows, "conversion_threads", lambda: 5)
    with caplog.at_level(logging.INFO, logger="batchlm.models.gguf_progress"):
        list(with_progress(iter_gguf_tensors(reader), reader, "GGUF tiny.gguf", REFERENCE_TYPES))
    assert "IQ2_XXS tensors dequantize" in caplog.records[0].getMessage()
    assert "here on 5 threads" in caplog.records[0].getMessage()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_numpy_cast_rounds_as_torch_does(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32)  # every exponent
    halfway = (rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << 16) | np.uint32(0x8000)  # ties
    special = np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 65520.0, 65519.0, 1e-45, 6e-8, 1e-40])
    values = np.concatenate([bits.view(np.float32), halfway.view(np.float32), special.astype(np.float32)])
    values = values[~np.isnan(values)]
    expected = torch.from_numpy(values).to(dtype)
    got = reference_rows.cast_like_torch(values, dtype)
    np.testing.assert_array_equal(got.view(np.uint8), _bits(expected).view(np.uint8))
    nan = reference_rows.cast_like_torch(np.array([np.nan, -np.nan], dtype=np.float32), dtype)
    assert torch.from_numpy(nan).view(dtype).isnan().all()


@pytest.mark.parametrize("kernels", [True, False])
def test_a_model_loads_the_same_on_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pools: list[RecordingPool], kernels: bool
) -> None:
    # A whole load with chunks of a few rows (the quantized CPU path, then the dense one): the logits
    # of the model loaded on three threads equal those of the model loaded on one.
    if kernels and quant_library() is None:
        pytest.skip("no AVX2 CPU or C compiler here")
    if not kernels:
        monkeypatch.setattr(registry, "kernels_available", lambda: False)
    gguf_path = write_tiny_gguf(tmp_path / "q" / "tiny.gguf", "llama", "IQ2_XXS", seed=2)
    monkeypatch.setattr(quant_blocks, "CHUNK_VALUES", 4 * 256)
    model_dir = prepare_gguf_model_dir(gguf_path, tmp_path / "c")
    logits = []
    for threads in (1, 3):
        monkeypatch.setattr(reference_rows, "conversion_threads", lambda threads=threads: threads)
        loaded = load_model(model_dir, torch.float32, torch.device("cpu"), progress=False)
        chunks = [Chunk([5, 17, 42, 99, 3], 0, [0, 1]), Chunk([11, 12, 13], 0, [2])]
        logits.append(run_step(loaded.model, make_kv_caches(loaded, 8), chunks))
    assert pools and all(pool.workers == 3 for pool in pools)
    assert torch.equal(logits[0], logits[1])


def test_a_load_runs_every_tensor_on_one_pool(
    pools: list[RecordingPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = [_tensor(qtype, rows=40) for qtype in ("Q2_K", "IQ3_S", "TQ2_0")]
    _small_chunks(monkeypatch, tensors[0].cols)
    with reference_rows.one_pool():
        got = [tensor.dequantize() for tensor in tensors] + [code_blocks(tensors[0]).codes]
    assert len(pools) == 1 and pools[0].submitted == 4 * 8
    assert not any(t.name.startswith("test-dequantize") for t in threading.enumerate())
    for tensor, values in zip(tensors, got, strict=False):
        np.testing.assert_array_equal(values.numpy(), _whole(tensor))


def test_a_tensor_of_few_chunks_is_cut_for_the_threads(pools: list[RecordingPool]) -> None:
    # 512 rows of 256 values are one default chunk: three threads get four of 128 rows (32K values).
    tensor = _tensor("IQ2_XXS", rows=512, blocks_per_row=1)
    np.testing.assert_array_equal(tensor.dequantize().numpy(), _whole(tensor))
    assert [pool.submitted for pool in pools] == [4]
    # 48 rows (12K values) stay one chunk, decoded on the calling thread.
    small = _tensor("IQ2_XXS", rows=48, blocks_per_row=1)
    np.testing.assert_array_equal(small.dequantize().numpy(), _whole(small))
    assert len(pools) == 1


# The types our own decoders read (quant_blocks.from_gguf): row chunks on the same pool.
OWN_TYPES = sorted(quant_blocks.GGUF_BLOCK_BYTES)


# Where each type's float16 scales (d, then dmin or a Q4_1/Q5_1 minimum) sit in its blocks.
OWN_SCALES = {"Q3_K": (108,), **{qtype: (0, 2) for qtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K")}}


def _raw(qtype: str, rows: int, blocks_per_row: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Random blocks of a [rows, cols] tensor of `qtype`, their scales small and finite."""
    rng = np.random.default_rng(seed)
    cols = blocks_per_row * quant_blocks.GGUF_BLOCK_SIZE[qtype]
    blocks = rng.integers(
        0, 256, (rows, blocks_per_row, quant_blocks.GGUF_BLOCK_BYTES[qtype]), dtype=np.uint8
    )
    for offset in OWN_SCALES.get(qtype, (0,)):
        halves = rng.uniform(-2e-3, 2e-3, (rows, blocks_per_row)).astype(np.float16)
        blocks[:, :, offset : offset + 2] = halves.view(np.uint8).reshape(rows, blocks_per_row, 2)
    if qtype == "MXFP4":  # its exponent byte, where float16 scales hold its powers of two exactly
        exponents = quant_blocks.MXFP4_EXPONENTS
        blocks[:, :, 0] = rng.integers(
            exponents.start, exponents.stop, (rows, blocks_per_row), dtype=np.uint8
        )
    return blocks.reshape(rows, -1), cols


def _arrays(blocks: quant_blocks.CodeBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return blocks.codes, blocks.scales, blocks.biases


def _same_bits(ours: quant_blocks.CodeBlocks, expected: quant_blocks.CodeBlocks) -> None:
    assert ours.bits == expected.bits
    for got, want in zip(_arrays(ours), _arrays(expected), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def _rows(blocks: quant_blocks.CodeBlocks, rows: int) -> quant_blocks.CodeBlocks:
    return quant_blocks.CodeBlocks(
        blocks.codes[:rows], blocks.scales[:rows], blocks.biases[:rows], blocks.bits
    )


@pytest.mark.parametrize("qtype", OWN_TYPES)
def test_own_decoders_on_the_pool_are_the_serial_blocks_bit_for_bit(
    qtype: str, pools: list[RecordingPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, cols = _raw(qtype, ROWS, 2)
    whole = quant_blocks.from_gguf(qtype, raw, ROWS, cols)  # one chunk (the default size)
    _small_chunks(monkeypatch, cols)
    for rows in (ROWS, 21, 1):  # 5-row chunks and a short last one; one chunk
        serial = quant_blocks.from_gguf(qtype, raw[:rows], rows, cols)
        _same_bits(serial, _rows(whole, rows))
        _same_bits(
            quant_blocks.from_gguf(qtype, raw[:rows], rows, cols, reference_rows.row_chunks(cols)), serial
        )
    # 23 and 21 rows ran on the pool (five chunks each); the one row inline.
    assert [pool.submitted for pool in pools] == [5, 5]
    assert all(pool.threads for pool in pools)


def test_own_decoders_run_their_chunks_on_the_runner_given() -> None:
    raw, cols = _raw("Q4_K", 37, 3)
    calls: list[tuple[int, int]] = []

    def backwards(
        rows: int, step: int, produce: Callable[[int, int], Any], consume: Callable[[int, int, Any], None]
    ) -> None:
        calls.append((rows, step))
        for start in reversed(range(0, rows, 4)):  # its own chunk size and order
            consume(start, min(rows, start + 4), produce(start, min(rows, start + 4)))

    _same_bits(
        quant_blocks.from_gguf("Q4_K", raw, 37, cols, backwards),
        quant_blocks.from_gguf("Q4_K", raw, 37, cols),
    )
    assert calls == [(37, quant_blocks.CHUNK_VALUES // cols)]


def test_loading_our_own_types_decodes_on_the_load_pool(
    pools: list[RecordingPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two tensors 512 values wide, eight 5-row chunks each, on the one pool of the load.
    tensors = [_tensor("Q4_K", rows=40)]
    raw, cols = _raw("Q8_0", 40, 16)
    tensors.append(QuantizedTensor("Q8_0", torch.from_numpy(raw), cols, 32, 34))
    _small_chunks(monkeypatch, 512)
    with reference_rows.one_pool():
        for tensor in tensors:
            expected = quant_blocks.from_gguf(tensor.qtype, tensor.data.numpy(), 40, 512)
            _same_bits(code_blocks(tensor), expected)
    assert len(pools) == 1 and pools[0].submitted == 16 and pools[0].threads
