"""Matmuls with quantized weights on x86-64 CPUs (cpu_quant_kernels.c, built like cpu_kernels.c).

A weight in code blocks (quant_blocks.py: 8- or 4-bit codes, float16 scale and bias per 32 inputs)
is packed once into 16-row panels (`pack`), and stays about that size in memory: 36 bytes per 32
weights for 8-bit codes, 20 for 4-bit, and 2 fewer where every bias is a fixed multiple of its scale
(Q8_0 and Q6_K read as Q8_0: 34, as in the file; Q4_0: 18, as in the file; Q4_1: 20; Q4_K: 18). `quant_linear` quantizes
the activation rows to int8 per block of 32, twice (the codes, then the codes of what they left over)
and multiplies with integer dot products (AVX-512 VNNI where the CPU has it, else AVX2; 8 activation
rows or more on AMX tiles where the CPU has them, with the same results); `quant_rows` reads rows
back in float32 (embedding lookups).

Activation quantization makes the result approximate: each block of x is rounded to about 1/64,000
of its largest magnitude (tests/test_cpu_quant.py states the bounds). Against the same x rounded that
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from batchlm.kernels.cpu_native import LibrarySource, native_library
from batchlm.kernels.quant_blocks import BLOCK, CodeBlocks, dequantize, from_dense_q8, q8_biases

logger = logging.getLogger(__name__)

QPANEL = 16  # output rows per panel; must match QPANEL in cpu_quant_kernels.c
SCALE_BYTES = 64  # 16 float16 scales + 16 float16 biases per panel block
# Zero points of the symmetric formats (Q8_0 and Q6_K's Q8_0: 128; Q5_0: 16; Q4_0 in 4 or 8 bits: 8):
# where every bias is -zero * its scale, panels hold only the scales (cpu_quant_kernels.c).
SYMMETRIC_ZEROS = (128, 16, 8)
# Panels packed at a time (16 output rows each): 256 rows of a 1,024-wide weight is 256 KB of codes.
PACK_PANELS = 16
# A Q6_K super-block: 256 values in 210 bytes.
Q6_K_VALUES, Q6_K_BYTES = 256, 210
SOURCE_PATH = Path(__file__).with_name("cpu_quant_kernels.c")
QUANT_KERNELS = LibrarySource(SOURCE_PATH)
# "avx2" forces the AVX2 path, "avx512" the AVX-512 VNNI path without AMX tiles (tests, A/B runs).
ISA_ENV = "BATCHLM_CPU_QUANT_ISA"
# The C kernels' `isa` argument.
ISA_AVX2, ISA_AVX512, ISA_AMX = 0, 1, 2


@dataclass(frozen=True)
class QuantizedWeight:
    """A [out_features, in_features] weight packed for the kernels, data[p] panel p (16 output rows):
    where biases are stored, its blocks one after another (16 scales, 16 biases, the codes); where
    `zero` gives them, every block's scales, then every block's codes. See cpu_quant_kernels.c for the
    byte layout."""

    data: torch.Tensor  # uint8 [ceil(out / 16), panel bytes]
    bits: int
    out_features: int
    in_features: int
    # The codes' zero point where every bias is -zero * its scale and none is stored; 0: stored.
    zero: int = 0

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def layout(self) -> int:
        """The kernels' `layout` argument: bit 0 for 4-bit codes, bits 1-3 log2 of the zero point."""
        zero_log2 = self.zero.bit_length() - 1 if self.zero else 0
        return int(self.bits == 4) | zero_log2 << 1


# Most parts of a weight packed in different forms (cpu_quant_kernels.c's MAX_PARTS): q, k and v.
MAX_PARTS = 3


class PackedParts(ctypes.Structure):
    """The kernels' view of a weight: its consecutive row parts, each in its own layout (part i holds
    panels [start[i], start[i + 1]) of the whole)."""

    _fields_ = [
        ("data", ctypes.c_void_p * MAX_PARTS),
        ("layout", ctypes.c_int * MAX_PARTS),
        ("start", ctypes.c_long * (MAX_PARTS + 1)),
        ("parts", ctypes.c_long),
    ]


@dataclass(frozen=True)
class PartedWeight:
    """A fused layer's weight whose shards came in different forms (say q and k in 4 bits, v in 8), as
    consecutive row parts packed apart rather than all widened to the widest; every part but the last
    a whole number of panels."""

    parts: tuple[QuantizedWeight, ...]

    @property
    def out_features(self) -> int:
        return sum(part.out_features for part in self.parts)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


# A linear's packed weight: one form, or parts in several.
PackedWeight = QuantizedWeight | PartedWeight


def parts_of(weight: PackedWeight) -> PackedParts:
    """The kernels' descriptor of a packed weight (it points into the weight's data: keep the weight)."""
    parts = weight.parts if isinstance(weight, PartedWeight) else (weight,)
    if len(parts) > MAX_PARTS:
        raise ValueError(f"a weight of {len(parts)} parts; the kernels take at most {MAX_PARTS}")
    descriptor = PackedParts()
    panel = 0
    for i, part in enumerate(parts):
        if i + 1 < len(parts) and part.out_features % QPANEL:
            raise ValueError("every part of a weight but the last must be a whole number of panels")
        descriptor.data[i] = part.data.data_ptr()
        descriptor.layout[i] = part.layout
        descriptor.start[i] = panel
        panel += -(-part.out_features // QPANEL)
    descriptor.start[len(parts)] = panel
    descriptor.parts = len(parts)
    return descriptor


def scale_rows_bytes(blocks: int) -> int:
    """Bytes of a panel's scales where no biases are stored: 16 halves a block, padded to whole
    cache lines (as the kernels' scale_rows_bytes)."""
    return -(-blocks * QPANEL * 2 // 64) * 64


def symmetric_zero(blocks: CodeBlocks) -> int:
    """The zero point z of SYMMETRIC_ZEROS for which every bias is -z times its scale, as the kernels
    compute it (float32, bit for bit), else 0."""
    scales = blocks.scales.astype(np.float32)
    biases = blocks.biases.astype(np.float32).view(np.uint32)
    for zero in SYMMETRIC_ZEROS:
        if np.array_equal(biases, (scales * np.float32(-zero)).view(np.uint32)):
            return zero
    return 0


def pack(blocks: CodeBlocks, *, omit_biases: bool = True) -> QuantizedWeight:
    """Panel-major copy of code blocks (rows past out_features are zero: scale and bias 0), packed
    PACK_PANELS panels at a time so that each chunk's reshuffles stay in cache. With omit_biases, the
    biases are left out where symmetric_zero finds them all given by the scales."""
    rows, cols = blocks.codes.shape
    panels, kb = -(-rows // QPANEL), cols // BLOCK
    zero = symmetric_zero(blocks) if omit_biases else 0
    body_bytes = QPANEL * BLOCK // 2 if blocks.bits == 4 else QPANEL * BLOCK
    panel_bytes = scale_rows_bytes(kb) + kb * body_bytes if zero else kb * (SCALE_BYTES + body_bytes)
    data = np.empty((panels, panel_bytes), dtype=np.uint8)
    for first in range(0, panels, PACK_PANELS):
        last = min(panels, first + PACK_PANELS)
        data[first:last] = _packed_panels(
            blocks, first * QPANEL, min(rows, last * QPANEL), last - first, zero
        )
    return QuantizedWeight(torch.from_numpy(data), blocks.bits, rows, cols, zero)


def _packed_panels(blocks: CodeBlocks, start: int, stop: int, panels: int, zero: int) -> np.ndarray:
    """Rows [start, stop) of the blocks as `panels` whole panels [panels, panel bytes]."""
    cols = blocks.codes.shape[1]
    kb = cols // BLOCK
    rows = stop - start
    codes = np.zeros((panels * QPANEL, cols), dtype=np.uint8)
    codes[:rows] = blocks.codes[start:stop]
    scale_bias = np.zeros((panels * QPANEL, kb, 2), dtype=np.float16)
    scale_bias[:rows, :, 0] = blocks.scales[start:stop]
    scale_bias[:rows, :, 1] = blocks.biases[start:stop]
    # [p, j, kb, s|b] -> [p, kb, s|b, j]: 16 scales then 16 biases per panel block.
    ordered = scale_bias.reshape(panels, QPANEL, kb, 2).transpose(0, 2, 3, 1)
    head = np.ascontiguousarray(ordered[:, :, :1] if zero else ordered).reshape(panels, kb, -1).view(np.uint8)
    grouped = codes.reshape(panels, QPANEL, kb, BLOCK)
    body: np.ndarray
    if blocks.bits == 4:
        # [p, j, kb, half, h, t] -> [p, kb, h, j, t]; half 0 in the low nibble, half 1 in the high one.
        quads = grouped.reshape(panels, QPANEL, kb, 2, 4, 4).transpose(0, 2, 3, 4, 1, 5)
        body = (quads[:, :, 0] | (quads[:, :, 1] << 4)).reshape(panels, kb, -1)
    else:
        body = grouped.reshape(panels, QPANEL, kb, 8, 4).transpose(0, 2, 3, 1, 4).reshape(panels, kb, -1)
    if not zero:
        return np.concatenate([head, body], axis=2).reshape(panels, -1)
    padding = np.zeros((panels, scale_rows_bytes(kb) - head[0].size), dtype=np.uint8)
    return np.concatenate([head.reshape(panels, -1), padding, body.reshape(panels, -1)], axis=1)


def dequantize_packed(weight: QuantizedWeight) -> torch.Tensor:
    """float32 [out, in] of a packed weight (the fallback path and the kernels' reference)."""
    data = weight.data.numpy()
    panels, kb = data.shape[0], weight.in_features // BLOCK
    if weight.zero:
        start = scale_rows_bytes(kb)
        scales = data[:, : kb * QPANEL * 2].copy().view(np.float16).reshape(panels, kb, 1, QPANEL)
        biases = (scales.astype(np.float32) * -weight.zero).astype(np.float16)
        head, body = np.concatenate([scales, biases], axis=2), data[:, start:].reshape(panels, kb, -1)
    else:
        by_block = data.reshape(panels, kb, -1)
        head = by_block[:, :, :SCALE_BYTES].copy().view(np.float16).reshape(panels, kb, 2, QPANEL)
        body = by_block[:, :, SCALE_BYTES:]
    if weight.bits == 4:
        quads = body.reshape(panels, kb, 4, QPANEL, 4)
        halves = np.stack([quads & 0x0F, quads >> 4], axis=2)  # [p, kb, half, h, j, t]
        codes = halves.transpose(0, 4, 1, 2, 3, 5)
    else:
        codes = body.reshape(panels, kb, 8, QPANEL, 4).transpose(0, 3, 1, 2, 4)
    rows = panels * QPANEL
    blocks = CodeBlocks(
        codes.reshape(rows, kb * BLOCK),
        head[:, :, 0].transpose(0, 2, 1).reshape(rows, kb),
        head[:, :, 1].transpose(0, 2, 1).reshape(rows, kb),
        weight.bits,
    )
    return torch.from_numpy(dequantize(blocks)[: weight.out_features])


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
            bias.data_ptr() if bias is not None else None, out.data_ptr(), m, weight.out_features, k,
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
    """Whether matmuls of 8 activation rows or more run on AMX tiles: this CPU has AMX-INT8, the OS
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
