"""The quantized CPU kernels' weight layout (cpu_quant_kernels.c reads it): a weight's code blocks
(quant_blocks.py: 8- or 4-bit codes, float16 scale and bias per 32 inputs) packed once into 16-row
panels (`pack`), one contiguous stream each. Per 32-input block a panel holds its 16 rows' scales and
biases, then their codes; where every bias is a fixed multiple of its scale (the symmetric formats)
the panel holds every block's scales, then every block's codes, and no biases. Symmetric 8-bit codes
drawn from a table of 16 (CodeBlocks.table: IQ4_NL, IQ4_XS, MXFP4) pack as their 4-bit indices
after a head holding the table (`table` panels: 4.5 bits a weight, where the codes take 8.5). A fused
layer's shards of different code widths pack as parts of one weight (`PartedWeight`). `parts_of` is
the kernels' descriptor of either.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from batchlm.kernels.quant_blocks import BLOCK, CodeBlocks, dequantize, scaled_halves

QPANEL = 16  # output rows per panel; must match QPANEL in cpu_quant_kernels.c
SCALE_BYTES = 64  # 16 float16 scales + 16 float16 biases per panel block
TABLE_BYTES = 64  # a table panel's head: its 16 codes, then zeros (cpu_quant_kernels.c's TABLE_BYTES)
LAYOUT_TABLE = 16  # the kernels' layout bit of table panels
# Whether pack() makes table panels where it may (tests and A/B runs set it off).
TABLES = True
# Zero points of the symmetric formats (Q8_0 and Q6_K's Q8_0: 128; Q5_0: 16; Q4_0 in 4 or 8 bits: 8):
# where every bias is -zero * its scale, panels hold only the scales (cpu_quant_kernels.c).
SYMMETRIC_ZEROS = (128, 16, 8)
# Panels packed at a time (16 output rows each): 256 rows of a 1,024-wide weight is 256 KB of codes.
PACK_PANELS = 16


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
    # 4-bit indices into a table of 8-bit codes at the head of each panel (bits is then 4).
    table: bool = False

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def layout(self) -> int:
        """The kernels' `layout` argument: bit 0 for 4-bit codes, bits 1-3 log2 of the zero point, bit 4
        for table indices."""
        zero_log2 = self.zero.bit_length() - 1 if self.zero else 0
        return int(self.bits == 4) | zero_log2 << 1 | (LAYOUT_TABLE if self.table else 0)


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


def pack(blocks: CodeBlocks, *, omit_biases: bool = True, tables: bool | None = None) -> QuantizedWeight:
    """Panel-major copy of code blocks (rows past out_features are zero: scale and bias 0), packed
    PACK_PANELS panels at a time so that each chunk's reshuffles stay in cache. With omit_biases, the
    biases are left out where symmetric_zero finds them all given by the scales; with tables too
    (TABLES where None), symmetric 8-bit codes of a table (blocks.table) keep their 4-bit indices in
    table panels."""
    tables = TABLES if tables is None else tables
    rows, cols = blocks.codes.shape
    panels, kb = -(-rows // QPANEL), cols // BLOCK
    zero = symmetric_zero(blocks) if omit_biases else 0
    table = blocks.table if tables and zero and blocks.bits == 8 else None
    index_of = _index_of(table) if table is not None else None
    head = TABLE_BYTES if table is not None else 0
    bits = 4 if table is not None else blocks.bits
    body_bytes = QPANEL * BLOCK // 2 if bits == 4 else QPANEL * BLOCK
    panel_bytes = head + (scale_rows_bytes(kb) + kb * body_bytes if zero else kb * (SCALE_BYTES + body_bytes))
    data = np.zeros((panels, panel_bytes), dtype=np.uint8)
    if table is not None:
        data[:, : len(table)] = table
    for first in range(0, panels, PACK_PANELS):
        last = min(panels, first + PACK_PANELS)
        data[first:last, head:] = _packed_panels(
            blocks, first * QPANEL, min(rows, last * QPANEL), last - first, zero, index_of
        )
    return QuantizedWeight(torch.from_numpy(data), bits, rows, cols, zero, table=table is not None)


def _index_of(table: np.ndarray) -> np.ndarray:
    """uint8 [256]: an index into `table` of each code it holds (0 for the others)."""
    index_of = np.zeros(256, dtype=np.uint8)
    index_of[table] = np.arange(len(table), dtype=np.uint8)
    return index_of


def _panel_codes(blocks: CodeBlocks, start: int, stop: int, index_of: np.ndarray | None) -> np.ndarray:
    """Rows [start, stop) of the codes, or their indices into blocks.table (ValueError for a code it
    does not hold)."""
    codes = blocks.codes[start:stop]
    if index_of is None or blocks.table is None:
        return codes
    indices: np.ndarray = index_of[codes]
    if not np.array_equal(blocks.table[indices], codes):
        raise ValueError("code blocks hold codes their table does not")
    return indices


def _packed_panels(
    blocks: CodeBlocks, start: int, stop: int, panels: int, zero: int, index_of: np.ndarray | None = None
) -> np.ndarray:
    """Rows [start, stop) of the blocks as `panels` whole panels [panels, panel bytes] (with index_of,
    a table panel's bytes after its head: the codes' 4-bit indices)."""
    cols = blocks.codes.shape[1]
    kb = cols // BLOCK
    rows = stop - start
    codes = np.zeros((panels * QPANEL, cols), dtype=np.uint8)
    codes[:rows] = _panel_codes(blocks, start, stop, index_of)
    scale_bias = np.zeros((panels * QPANEL, kb, 2), dtype=np.float16)
    scale_bias[:rows, :, 0] = blocks.scales[start:stop]
    scale_bias[:rows, :, 1] = blocks.biases[start:stop]
    # [p, j, kb, s|b] -> [p, kb, s|b, j]: 16 scales then 16 biases per panel block.
    ordered = scale_bias.reshape(panels, QPANEL, kb, 2).transpose(0, 2, 3, 1)
    head = np.ascontiguousarray(ordered[:, :, :1] if zero else ordered).reshape(panels, kb, -1).view(np.uint8)
    grouped = codes.reshape(panels, QPANEL, kb, BLOCK)
    body: np.ndarray
    if blocks.bits == 4 or index_of is not None:
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
    table = data[0, :16] if weight.table and len(data) else None
    if weight.table:
        data = data[:, TABLE_BYTES:]
    panels, kb = data.shape[0], weight.in_features // BLOCK
    if weight.zero:
        start = scale_rows_bytes(kb)
        scales = data[:, : kb * QPANEL * 2].copy().view(np.float16).reshape(panels, kb, 1, QPANEL)
        biases = scaled_halves(scales, -weight.zero)
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
    if table is not None:
        codes = table[codes]
    rows = panels * QPANEL
    blocks = CodeBlocks(
        codes.reshape(rows, kb * BLOCK),
        head[:, :, 0].transpose(0, 2, 1).reshape(rows, kb),
        head[:, :, 1].transpose(0, 2, 1).reshape(rows, kb),
        weight.bits,
    )
    return torch.from_numpy(dequantize(blocks)[: weight.out_features])
