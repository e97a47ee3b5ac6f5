"""What the tests of the quantized CPU kernels and the code blocks they read share: the GGUF types
the kernels read, random blocks of them with small finite scales, gguf's own dequantize of them, and
the mark of a test that needs the kernels' library (an AVX2 CPU and a C compiler)."""

from __future__ import annotations

import numpy as np
import pytest

from batchlm.kernels import cpu_quant
from batchlm.kernels.quant_blocks import MXFP4_EXPONENTS

gguf = pytest.importorskip("gguf")
needs_kernel = pytest.mark.skipif(cpu_quant.quant_library() is None, reason="no AVX2 CPU or C compiler here")
RNG = np.random.default_rng(0)
GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "MXFP4"]
# Where each type's float16 scales lie in its block (d, then dmin where it has one): offset, count.
SCALE_FIELDS = {
    **{"Q8_0": (0, 1), "Q4_0": (0, 1), "Q5_0": (0, 1), "Q4_1": (0, 2), "Q5_1": (0, 2)},
    **{"Q3_K": (108, 1), "Q4_K": (0, 2), "Q5_K": (0, 2)},
}


def random_gguf(type_name: str, rows: int, cols: int) -> np.ndarray:
    """Random bytes as GGUF blocks of `type_name`, with their float16 scales made small and finite
    (MXFP4's exponent bytes within float16's range)."""
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, (rows * cols // block_size, block_bytes), dtype=np.uint8)
    if type_name == "MXFP4":  # its exponent bytes: any whose scale float16 holds (2^-24..2^8)
        blocks[:, 0] = RNG.integers(MXFP4_EXPONENTS.start, MXFP4_EXPONENTS.stop, len(blocks))
        return blocks.reshape(rows, -1)
    at, halves = SCALE_FIELDS[type_name]
    scales = RNG.uniform(-0.02, 0.02, (len(blocks), halves)).astype(np.float16)
    blocks[:, at : at + 2 * halves] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def reference(type_name: str, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    return gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
