"""Matmuls with quantized weights on x86-64 CPUs (cpu_quant_kernels.c, built like cpu_kernels.c).

A weight in code blocks (quant_blocks.py: 8- or 4-bit codes, float16 scale and bias per 32 inputs)
is packed once into 16-row panels (quant_panels.py), and stays about that size in memory: 36 bytes per
32 weights for 8-bit codes, 20 for 4-bit, and 2 fewer where every bias is a fixed multiple of its scale
(Q8_0 and Q6_K read as Q8_0: 34, as in the file; Q4_0: 18 and Q4_1: 20, as in the file; Q4_K: 20, where
the file has 18; Q5_K: 36, where the file has 22; Q3_K: 34, where the file has 13.75); IQ4_NL's, IQ4_XS's and MXFP4's 8-bit
codes as 4-bit indices into a table of them: 18 (and 64 bytes a panel), where the files have 18, 17
and 17. `quant_linear` quantizes the activation rows to int8 per block of 32, twice (the
codes, then the codes of what they left over) and multiplies with integer dot products (AVX-512 VNNI where the CPU has it, else AVX2; 8 activation
rows or more, 16 for 4-bit codes, on AMX tiles where the CPU has them, with the same results); `quant_rows` reads rows
back in float32 (embedding lookups).

Activation quantization makes the result approximate: each block of x is rounded to about 1/64,000
of its largest magnitude (tests/test_cpu_quant_kernels.py states the bounds). Against the same x rounded that
way (`quantized_activations`) the kernels are exact up to float32 summation order.
Where the library is unavailable (no compiler or AVX2, BATCHLM_CPU_KERNELS=0), `quant_library()` is
None and callers dequantize instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from batchlm.kernels.cpu_native import LibrarySource, native_library, pointer_of
from batchlm.kernels.dense_blocks import from_dense_q8, q8_biases
from batchlm.kernels.quant_blocks import BLOCK, CodeBlocks
from batchlm.kernels.quant_panels import PackedWeight, QuantizedWeight, dequantize_packed, pack, parts_of

logger = logging.getLogger(__name__)

# A Q6_K super-block: 256 values in 210 bytes.
Q6_K_VALUES, Q6_K_BYTES = 256, 210
SOURCE_PATH = Path(__file__).with_name("cpu_quant_kernels.c")
QUANT_KERNELS = LibrarySource(SOURCE_PATH)
# "avx2" forces the AVX2 path, "avx512" the AVX-512 VNNI path without AMX tiles (tests, A/B runs).
ISA_ENV = "BATCHLM_CPU_QUANT_ISA"
# The C kernels' `isa` argument.
ISA_AVX2, ISA_AVX512, ISA_AMX = 0, 1, 2


def quant_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias for float32 CPU x [..., in_features]; needs quant_library() (not None)."""
    library = quant_library()
    if library is None:
        raise RuntimeError("the quantized CPU kernels are not available on this machine")
    return _gemm(library, x, weight, bias)


def _gemm(
    library: ctypes.CDLL, x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    k = weight.in_features
    rows = x.reshape(-1, k)
    if rows.dtype != torch.float32:
        rows = rows.float()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, weight.out_features, dtype=torch.float32)
    if m > 0:
        if bias is not None:
            bias = bias.float().contiguous()
        status = library.batchlm_quant_linear(
            rows.data_ptr(), rows.stride(0), ctypes.byref(parts_of(weight)),
            pointer_of(bias), out.data_ptr(), m, weight.out_features, k,
            torch.get_num_threads(), quant_isa(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("no memory for the quantized activations")
    return out.view(*x.shape[:-1], weight.out_features)


def quant_rows(weight: QuantizedWeight, ids: torch.Tensor) -> torch.Tensor:
    """float32 rows W[ids] ([*ids.shape, in_features]) through the kernels; ids must be in range."""
    library = quant_library()
    if library is None:
        raise RuntimeError("the quantized CPU kernels are not available on this machine")
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape[0], weight.in_features, dtype=torch.float32)
    library.batchlm_quant_rows(
        weight.data.data_ptr(), weight.layout, flat.data_ptr(), flat.shape[0], out.data_ptr(),
        weight.in_features, weight.in_features,
    )  # fmt: skip
    return out.view(*ids.shape, weight.in_features)


def _forced_isa() -> str:
    return os.environ.get(ISA_ENV, "").strip().lower()


@functools.cache
def use_avx512() -> bool:
    """Whether the AVX-512 VNNI path runs (this CPU has it, and BATCHLM_CPU_QUANT_ISA is not avx2)."""
    library = _raw_library()
    if library is None or _forced_isa() == "avx2":
        return False
    return bool(library.batchlm_quant_has_avx512_vnni())


@functools.cache
def use_amx() -> bool:
    """Whether matmuls of 8 activation rows or more (16 for 4-bit codes) run on AMX tiles: this CPU has AMX-INT8, the OS
    grants this process the tile state, and BATCHLM_CPU_QUANT_ISA does not force another path."""
    library = _raw_library()
    if library is None or not use_avx512() or _forced_isa() == "avx512":
        return False
    return bool(library.batchlm_quant_has_amx())


def quant_isa() -> int:
    """The kernels' `isa` argument for this CPU."""
    if use_amx():
        return ISA_AMX
    return ISA_AVX512 if use_avx512() else ISA_AVX2


@functools.cache
def quant_library() -> ctypes.CDLL | None:
    """The quantized kernels once they agreed with the dequantized matmul on a probe; else None."""
    library = _raw_library()
    if library is None:
        return None
    if not _quant_agrees(library):
        logger.warning("quantized CPU kernels disagree with the dequantized matmul on a probe; not used")
        return None
    return library


@functools.cache
def _raw_library() -> ctypes.CDLL | None:
    if native_library() is None:  # disabled, no AVX2, or no compiler (already logged)
        return None
    try:
        library = ctypes.CDLL(str(QUANT_KERNELS.build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("quantized CPU kernels unavailable (%s); dequantizing weights instead", error)
        return None
    size, pointer = ctypes.c_long, ctypes.c_void_p
    for probe in (library.batchlm_quant_has_avx512_vnni, library.batchlm_quant_has_amx):
        probe.argtypes = []
        probe.restype = ctypes.c_int
    library.batchlm_quantize_rows_q8.argtypes = [
        pointer,
        size,
        pointer,
        pointer,
        pointer,
        size,
        size,
        ctypes.c_int,
    ]
    library.batchlm_quantize_rows_q8.restype = None
    library.batchlm_quant_gemm.argtypes = [
        pointer, ctypes.c_int, pointer, pointer, pointer,  # weight, its layout, codes, scales, scale * sums
        pointer, pointer, size,  # bias or NULL, out, its row stride
        size, size, size, ctypes.c_int, ctypes.c_int,  # M, N, K, threads, isa
    ]  # fmt: skip
    library.batchlm_quant_gemm.restype = ctypes.c_int
    library.batchlm_quant_linear.argtypes = [
        pointer, size, pointer, pointer, pointer,  # x, its row stride, the weight's parts, bias, out
        size, size, size, ctypes.c_int, ctypes.c_int,  # M, N, K, threads, isa
    ]  # fmt: skip
    library.batchlm_quant_linear.restype = ctypes.c_int
    library.batchlm_quant_rows.argtypes = [pointer, ctypes.c_int, pointer, size, pointer, size, size]
    library.batchlm_quant_rows.restype = None
    library.batchlm_q6_k_to_q8.argtypes = [pointer, size, pointer, pointer, ctypes.c_int]
    library.batchlm_q6_k_to_q8.restype = None
    return library


def q6_k_as_q8(raw: np.ndarray, rows: int, cols: int) -> CodeBlocks | None:
    """A Q6_K tensor's raw bytes (uint8, rows * row bytes) as Q8_0 code blocks, equal to
    from_dense_q8 of its dequantized values, in one native pass; None without the native kernels."""
    library = quant_library()
    if library is None or cols % Q6_K_VALUES:
        return None
    blocks = np.ascontiguousarray(raw, dtype=np.uint8)
    n_blocks = rows * cols // Q6_K_VALUES
    if blocks.size != n_blocks * Q6_K_BYTES:
        raise ValueError(
            f"a Q6_K tensor of {rows} x {cols} values holds {n_blocks * Q6_K_BYTES} bytes, not {blocks.size}"
        )
    codes = np.empty((rows, cols), dtype=np.uint8)
    scales = np.empty((rows, cols // BLOCK), dtype=np.float16)
    library.batchlm_q6_k_to_q8(
        blocks.ctypes.data, n_blocks, codes.ctypes.data, scales.ctypes.data, torch.get_num_threads()
    )
    return CodeBlocks(codes, scales, q8_biases(scales), 8)


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """float32 x [M, K] as the kernels see it: each block of 32 rounded to multiples of max|x| / 127,
    plus what that left over rounded the same way (two int8 passes). (x with these activations) @
    dequantize_packed(W)^T is what quant_linear computes, up to float rounding: the kernels' exact
    reference."""
    first = _one_pass(x.float())
    return first + _one_pass(x.float() - first)


def _one_pass(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(x.shape[0], -1, BLOCK)
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    return (torch.round(blocks * inverse) * (largest / 127.0)).reshape(x.shape)


def _quant_agrees(library: ctypes.CDLL) -> bool:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=generator)
    weight = torch.randn(21, 64, generator=generator)
    nibbles = torch.randint(0, 16, (21, 64), dtype=torch.uint8, generator=generator).numpy()
    scales = np.full((21, 2), 0.25, dtype=np.float16)
    # Q8_0 (no biases stored), 4-bit codes with biases stored, and Q4_0 (none stored).
    probes = [from_dense_q8(weight.numpy()), CodeBlocks(nibbles, scales, -2 * scales, 4)]
    probes.append(CodeBlocks(nibbles, scales, -8 * scales, 4))
    for packed in map(pack, probes):
        reference = quantized_activations(x) @ dequantize_packed(packed).t()
        if not torch.allclose(_gemm(library, x, packed, None), reference, atol=1e-3, rtol=1e-4):
            return False
    return True
