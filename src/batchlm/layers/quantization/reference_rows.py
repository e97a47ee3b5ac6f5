"""GGUF tensors through the gguf package's numpy reference code, row chunks at a time on the engine's
CPU threads: the block types no kernel of ours reads (gguf_types.REFERENCE_TYPES) cost tens of
seconds a GB on one core, and every block type goes this way where the quantized CPU kernels do
not run (GPU, dense paths).

Blocks never span rows and the reference code works value by value, so a chunk's values are the
bytes the whole tensor's would be: chunking changes nothing but where the work runs. numpy drops
the GIL in its large vectorised operations (the grids' fancy indexing included), where the reference
code spends most of its time: one thread decoding holds the GIL for 12-27% of it (py-spy, by type),
which bounds what threads gain to a few times however many cores (BENCHMARKS.md). At most
IN_FLIGHT chunks per thread are decoded ahead of their consumer, so a tensor's float32 copy is
never made whole on the way. Our own decoders' row chunks (quant_blocks.from_gguf) run here too,
through row_chunks().
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from batchlm.kernels import dense_blocks, quant_blocks

if TYPE_CHECKING:
    from batchlm.layers.quantization.base import QuantizedTensor

T = TypeVar("T")
# Chunks each thread may have decoded or in progress ahead of the consumer: enough to keep every
# thread busy while the consumer copies one out, few enough to bound the memory.
IN_FLIGHT = 2
# The least a chunk is cut to when a tensor has too few chunks for the threads: whole groups of 16
# rows (the gguf package decodes 16 rows a call), and some 0.5 ms of decoding.
MIN_CHUNK_ROWS = 16
MIN_CHUNK_VALUES = 1 << 15
# The pool of the conversions inside one_pool(), and its thread count.
_POOL: contextvars.ContextVar[tuple[Executor, int] | None] = contextvars.ContextVar(
    "batchlm_dequantize_pool", default=None
)


def conversion_threads() -> int:
    """Threads for a conversion: torch's thread count (what the engine computes with: BATCHLM_CORE_THREADS,
    capped at the CPUs available (runner/cpu_threads.py), a tensor-parallel rank's share), never more
    than the CPUs this process may run on. Loading happens before serving, so these are free."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus))


def make_executor(workers: int) -> Executor:
    """The pool one conversion runs its chunks on (tests put a recording one in its place)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="batchlm-dequantize")


def chunk_rows(cols: int) -> int:
    """Rows a chunk of a tensor `cols` values wide holds: quant_blocks.CHUNK_VALUES values (2 MB of
    float32), as q8_from_row_chunks takes them."""
    return max(1, quant_blocks.CHUNK_VALUES // max(cols, 1))


@contextlib.contextmanager
def one_pool() -> Iterator[None]:
    """Run the conversions inside (of this thread or task) on one pool of conversion_threads()
    threads: a GGUF file's hundreds of tensors (thousands, with a mixture of experts' one a tensor)
    would each start and join a pool of their own, about a millisecond a time."""
    workers = conversion_threads()
    if _POOL.get() is not None or workers <= 1:
        yield
        return
    with make_executor(workers) as pool:
        token = _POOL.set((pool, workers))
        try:
            yield
        finally:
            _POOL.reset(token)


def map_row_chunks(
    rows: int,
    step: int,
    produce: Callable[[int, int], T],
    consume: Callable[[int, int, T], None],
    threads: int | None = None,
    cols: int = 0,
) -> None:
    """produce(start, stop) for rows [start, stop) of every chunk of at most `step` rows (fewer where
    that gives the threads too few chunks, not below MIN_CHUNK_VALUES of rows `cols` values wide), on
    up to `threads` threads (conversion_threads() when None, on one_pool()'s pool inside it);
    consume(start, stop, result) of each, in row order, on the calling thread. `produce` must touch
    only numpy (a torch op there would start torch's own threads on every worker). One chunk, or one
    thread, runs inline without a pool."""
    shared = _POOL.get() if threads is None else None
    workers = shared[1] if shared is not None else conversion_threads() if threads is None else threads
    if workers > 1:
        # Two chunks a thread where the tensor is big enough (a mixture of experts' tensors are a few
        # default chunks each), none so small that the calls' overhead would tell.
        smallest = max(MIN_CHUNK_ROWS, MIN_CHUNK_VALUES // cols if cols else 0)
        step = min(step, max(smallest, -(-rows // (IN_FLIGHT * workers))))
    bounds = [(start, min(rows, start + step)) for start in range(0, rows, step)]
    if len(bounds) <= 1 or workers <= 1:
        quant_blocks.serial_chunks(rows, step, produce, consume)
        return
    if shared is not None:
        _run(shared[0], workers, bounds, produce, consume)
        return
    with make_executor(min(workers, len(bounds))) as pool:
        _run(pool, workers, bounds, produce, consume)


def _run(
    pool: Executor,
    workers: int,
    bounds: list[tuple[int, int]],
    produce: Callable[[int, int], T],
    consume: Callable[[int, int, T], None],
) -> None:
    pending: deque[tuple[int, int, Future[T]]] = deque()
    try:
        for start, stop in bounds:
            if len(pending) >= IN_FLIGHT * workers:
                first, end, future = pending.popleft()
                consume(first, end, future.result())
            pending.append((start, stop, pool.submit(produce, start, stop)))
        while pending:
            first, end, future = pending.popleft()
            consume(first, end, future.result())
    finally:
        for _, _, future in pending:  # a failed chunk: skip those not started
            future.cancel()
        # and let those running end, so that no work of this conversion outlives it on a shared pool
        futures_wait([future for _, _, future in pending if not future.cancelled()])


def reference_values(tensor: QuantizedTensor, start: int, stop: int) -> np.ndarray:
    """float32 [stop - start, cols] values of rows [start, stop), by the gguf package's code (numpy
    only: safe on a worker thread)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = np.ascontiguousarray(tensor.data.numpy()[start:stop])
    values = dequantize(raw, GGMLQuantizationType[tensor.qtype])
    return values.reshape(stop - start, tensor.cols)


def dequantize(tensor: QuantizedTensor, dtype: torch.dtype, threads: int | None = None) -> torch.Tensor:
    """The tensor's [rows, cols] values in `dtype`: float32 from the reference code, then cast as
    torch's .to(dtype) casts, a chunk at a time on the worker threads."""
    rows, cols = tensor.shape
    out = torch.empty((rows, cols), dtype=dtype)
    target = _numpy_target(out)

    def produce(start: int, stop: int) -> np.ndarray:
        values = reference_values(tensor, start, stop)
        return values if target is None else cast_like_torch(values, dtype)

    def consume(start: int, stop: int, values: np.ndarray) -> None:
        if target is not None:
            target[start:stop] = values
        else:  # a dtype numpy does not hold: torch's cast, on the calling thread
            out[start:stop].copy_(torch.from_numpy(values))

    map_row_chunks(rows, chunk_rows(cols), produce, consume, threads, cols)
    return out


def _numpy_target(out: torch.Tensor) -> np.ndarray | None:
    """`out` as the numpy array cast_like_torch's results go into, or None for other dtypes."""
    if out.dtype in (torch.float32, torch.float16):
        return out.numpy()
    if out.dtype == torch.bfloat16:
        return out.view(torch.int16).numpy()
    return None


def cast_like_torch(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 `values` as torch's cast to float32, float16 or bfloat16 rounds them (bfloat16 as its
    bits, int16), in numpy: a torch op on a worker thread would start a team of torch's threads on
    each, and those spin where the engine's OpenMP wait policy is active (GPU hosts)."""
    if dtype == torch.float32:
        return values
    if dtype == torch.float16:
        with np.errstate(over="ignore"):  # to infinity, as torch's cast, without a warning
            return values.astype(np.float16)  # IEEE round to nearest even, as torch
    if dtype != torch.bfloat16:
        raise ValueError(f"no numpy cast to {dtype}")
    bits = values.view(np.uint32)
    # bfloat16: the top 16 bits, rounded to nearest even (c10::BFloat16's rule); NaN stays NaN.
    rounded = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0
    return rounded.view(np.int16)


def row_chunks(cols: int, threads: int | None = None) -> quant_blocks.ChunkMap:
    """quant_blocks' chunk runner for a tensor `cols` values wide: map_row_chunks on up to `threads`
    threads (one_pool()'s inside it)."""

    def chunks(
        rows: int, step: int, produce: Callable[[int, int], T], consume: Callable[[int, int, T], None]
    ) -> None:
        map_row_chunks(rows, step, produce, consume, threads, cols)

    return chunks


def q8_code_blocks(tensor: QuantizedTensor, threads: int | None = None) -> quant_blocks.CodeBlocks:
    """dense_blocks.q8_from_row_chunks of the tensor's reference values, each chunk decoded and
    requantized on a worker thread."""
    rows, cols = tensor.shape
    return dense_blocks.q8_from_row_chunks(
        rows, cols, lambda start, stop: reference_values(tensor, start, stop), row_chunks(cols, threads)
    )
