"""Progress lines while a GGUF file's weights load. Block types that only the gguf package's numpy
code reads (gguf_types.REFERENCE_TYPES: i-quants, Q2_K, TQ types) dequantize at tens of seconds
a GB of them a CPU thread (an IQ3_S 8B file: minutes; row chunks run on the engine's CPU threads:
layers/quantization/reference_rows.py), and so does every block type where the quantized CPU
kernels do not run: a start-up that said nothing that long would look hung."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from batchlm.models.gguf_file import weight_tensors
from batchlm.models.gguf_reader import GGUFFile

if TYPE_CHECKING:
    from batchlm.layers.quantization.base import LoadedWeight

logger = logging.getLogger(__name__)

# Seconds between progress lines (a load that ends sooner logs none).
PROGRESS_INTERVAL_S = 15.0
# Slow-type bytes worth a line before the load starts (some seconds of it).
ANNOUNCED_BYTES = 1 << 27
_GB = 1e9


def with_progress(
    weights: Iterable[tuple[str, LoadedWeight]],
    reader: GGUFFile,
    label: str,
    reference_types: frozenset[str],
    *,
    clock: Callable[[], float] = time.monotonic,
    interval: float = PROGRESS_INTERVAL_S,
) -> Iterator[tuple[str, LoadedWeight]]:
    """`weights` (iter_gguf_tensors of `reader`) as they are, logging every `interval` seconds how
    much of the file's tensor data has loaded and at what rate, naming the file's types in
    `reference_types`. A tensor counts as loaded once the next one is asked for (its consumer has
    dequantized it by then)."""
    tensors = weight_tensors(reader)
    total = sum(t.data.nbytes for t in tensors)
    slow_types = sorted({t.tensor_type.name for t in tensors} & reference_types)
    why = (
        f"; its {', '.join(slow_types)} tensors dequantize through the gguf package's numpy code"
        if slow_types
        else ""
    )
    slow_bytes = sum(t.data.nbytes for t in tensors if t.tensor_type.name in reference_types)
    if slow_bytes >= ANNOUNCED_BYTES:
        from batchlm.layers.quantization.reference_rows import conversion_threads

        logger.info(
            "%s: %.2f GB of %s tensors dequantize through the gguf package's numpy code, tens of seconds a "
            "GB a CPU thread, here on %d threads: loading takes a while (progress every %.0f s)",
            label,
            slow_bytes / _GB,
            ", ".join(slow_types),
            conversion_threads(),
            interval,
        )
    start = last = clock()
    done = 0
    for name, loaded in weights:
        now = clock()
        if done and now - last >= interval:
            elapsed = now - start
            logger.info(
                "%s: %.2f of %.2f GB of weights loaded (%d%%) in %.0f s, %.0f s a GB%s",
                label,
                done / _GB,
                total / _GB,
                100 * done // max(total, 1),
                elapsed,
                elapsed * _GB / done,
                why,
            )
            last = now
        yield name, loaded
        done += stored_bytes(loaded)


def stored_bytes(loaded: LoadedWeight) -> int:
    """The bytes a loaded GGUF tensor came from (one expert's share of a stack: its own)."""
    import torch

    from batchlm.layers.quantization.base import QuantizedColumns, QuantizedTensor

    if isinstance(loaded, QuantizedColumns):
        loaded = loaded.blocks
    if isinstance(loaded, QuantizedTensor):
        return int(loaded.data.numel())
    if isinstance(loaded, torch.Tensor):
        return int(loaded.numel() * loaded.element_size())
    return 0
