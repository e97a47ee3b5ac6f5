"""GGUF quantized blocks (and dense float weights) as per-32 blocks of unsigned codes with a float16
scale and bias, w = scale * code + bias: the form the quantized CPU kernels run (cpu_quant.py).

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 map exactly (their scales are float16 already). Q4_K's and Q5_K's
per-sub-block scale d * sc and offset dmin * m are products of a float16 and a 6-bit integer, rounded
here to float16 (relative error <= 2^-11, far below a 5-bit step); Q5_K's codes (0..31) take 8 bits,
as Q5_0's and Q5_1's. Q3_K's values d * (sc - 32) * q, its 16-value sub-blocks' scales folded into
8-bit codes of Q8_0's zero point under the float16 scale -d, map exactly. IQ4_NL and IQ4_XS index a
table of 16 non-uniform int8 levels, which no 4-bit affine code holds: they become 8-bit codes
(level + 128), IQ4_NL's exactly, IQ4_XS's sub-block scale d * (ls - 32) rounded to float16 as Q4_K's.
MXFP4 (OCP microscaling, gpt-oss's experts) holds 4-bit e2m1 codes, whose values times two are the
integers -12..12, under a shared power of two 2^(e - 127): 8-bit codes 2 * value + 128 under the
float16 scale 2^(e - 128), exactly while that power lies in float16's range (mxfp4_scales says which
blocks do). The IQ4s' and MXFP4's 8-bit codes come with their table of 16 (CODE_TABLES), which the
panels keep them as indices into (quant_panels.py). Pure numpy: no torch, no gguf import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

BLOCK = 32
# Values converted at a time by from_gguf and dense_blocks' quantizers (2 MB of float32).
CHUNK_VALUES = 1 << 19
# Bytes per block (per super-block of 256 for the K-quants and IQ4_XS) of each GGUF type read here.
GGUF_BLOCK_BYTES = {
    **{"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24},
    **{"Q3_K": 110, "Q4_K": 144, "Q5_K": 176},
    **{"IQ4_NL": 18, "IQ4_XS": 136, "MXFP4": 17},
}
GGUF_BLOCK_SIZE = {
    **{"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32},
    **{"Q3_K": 256, "Q4_K": 256, "Q5_K": 256},
    **{"IQ4_NL": 32, "IQ4_XS": 256, "MXFP4": 32},
}
# llama.cpp's IQ4_NL / IQ4_XS levels (kvalues_iq4nl), which their 4-bit indices pick.
IQ4_LEVELS = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int16
)
# The e2m1 values of MXFP4's 4-bit codes times two (bit 3 the sign: code 8 is -0), as GGUF stores
# them: a GGUF block's shared scale is half the format's, 2^(e - 128) for its exponent byte e.
MXFP4_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int16)
# The exponent bytes whose scale 2^(e - 128) float16 holds exactly (2^-24, its least subnormal, up
# to 2^8), with the bias -128 * 2^(e - 128) of the codes' zero point (up to 2^15) finite too.
MXFP4_EXPONENTS = range(128 - 24, 128 + 8 + 1)


class UnrepresentableBlocks(ValueError):
    """Blocks whose values no code block of float16 scales holds exactly (MXFP4 exponents out of
    float16's range): the caller takes the tensor another way."""


@dataclass(frozen=True)
class CodeBlocks:
    """A [rows, cols] weight as codes [rows, cols] uint8 (< 16 when bits == 4), scales and biases
    [rows, cols / 32] float16: w[r, c] = scales[r, c // 32] * codes[r, c] + biases[r, c // 32].
    `table`, where set (uint8 [16]), holds every value the 8-bit codes take (IQ4_NL's, IQ4_XS's and
    MXFP4's codes of their 4-bit indices): the panels may keep the indices instead (quant_panels)."""

    codes: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int  # 8 or 4
    table: np.ndarray | None = None


def supported(type_name: str) -> bool:
    return type_name in GGUF_BLOCK_BYTES


# A chunk's Q8_0 codes and scales; a chunk's decoded blocks (codes, scales, biases, bits).
Coded = tuple[np.ndarray, np.ndarray]
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, int]
T = TypeVar("T")


class ChunkMap(Protocol):
    """How from_gguf and dense_blocks' quantizers run their chunks: (rows, step, produce, consume) calls
    produce(start, stop) for every `step`-row chunk (or fewer rows: chunks of any size are fine) and
    hands each result to consume; produce may run on other threads, consume only on the caller's."""

    def __call__(
        self,
        rows: int,
        step: int,
        produce: Callable[[int, int], T],
        consume: Callable[[int, int, T], None],
    ) -> None: ...


def serial_chunks(
    rows: int, step: int, produce: Callable[[int, int], T], consume: Callable[[int, int, T], None]
) -> None:
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        consume(start, stop, produce(start, stop))


def from_gguf(
    type_name: str, raw: np.ndarray, rows: int, cols: int, chunks: ChunkMap = serial_chunks
) -> CodeBlocks:
    """The code blocks of a GGUF tensor of `type_name` whose data is `raw` (uint8, rows * row bytes),
    decoded CHUNK_VALUES at a time (in whole rows) so that each chunk's temporaries stay in cache.
    `chunks` runs the chunks (in parallel: blocks never span rows and a chunk's decode reads only its
    own, so the result is the same)."""
    block_size, block_bytes = GGUF_BLOCK_SIZE[type_name], GGUF_BLOCK_BYTES[type_name]
    if cols % block_size:
        raise ValueError(f"{type_name} rows of {cols} values are not whole blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // block_size * block_bytes)
    decode = _DECODERS[type_name]
    codes = np.empty((rows, cols), dtype=np.uint8)
    scales = np.empty((rows, cols // BLOCK), dtype=np.float16)
    biases = np.empty_like(scales)
    widths: list[int] = []  # every chunk's, one value

    def produce(start: int, stop: int) -> Decoded:
        return decode(blocks[start:stop].reshape(-1, block_bytes))

    def consume(start: int, stop: int, decoded: Decoded) -> None:
        chunk_codes, chunk_scales, chunk_biases, bits = decoded
        codes[start:stop] = chunk_codes.reshape(stop - start, cols)
        scales[start:stop] = chunk_scales.reshape(stop - start, -1)
        biases[start:stop] = chunk_biases.reshape(stop - start, -1)
        widths.append(bits)

    chunks(rows, max(1, CHUNK_VALUES // max(cols, 1)), produce, consume)
    bits = widths[0] if widths else produce(0, 0)[3]  # no rows: the type's width all the same
    return CodeBlocks(codes, scales, biases, bits, CODE_TABLES.get(type_name))


def columns(blocks: CodeBlocks, start: int, length: int) -> CodeBlocks:
    """Columns [start, start + length) of the blocks (both multiples of 32), copied."""
    if start % BLOCK or length % BLOCK:
        raise ValueError(f"code blocks split only on {BLOCK}-column edges, not at {start}..{start + length}")
    first, count = start // BLOCK, length // BLOCK
    return CodeBlocks(
        np.ascontiguousarray(blocks.codes[:, start : start + length]),
        np.ascontiguousarray(blocks.scales[:, first : first + count]),
        np.ascontiguousarray(blocks.biases[:, first : first + count]),
        blocks.bits,
        blocks.table,
    )


def from_int_groups(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, bits: int = 4
) -> CodeBlocks:
    """`bits`-bit codes [rows, cols] (4, or GPTQ's 8) with a scale and a zero point per group of
    `group_size` inputs (GPTQ, AWQ and compressed-tensors checkpoints: w = (code - zero) * scale; the
    last group may be partial), group_size a multiple of 32: the codes as they are, each block taking
    its group's scale and -zero * scale as float16 (the bias rounded, relative error <= 2^-11 as
    Q4_K's offsets; a scale wider than float16 rounded too)."""
    cols = codes.shape[1]
    if group_size % BLOCK or cols % BLOCK:
        raise ValueError(f"groups of {group_size} over {cols} inputs are not whole {BLOCK}-value blocks")
    group_of_block = np.arange(cols // BLOCK) * BLOCK // group_size
    group_scales = scales.astype(np.float32)
    biases = -zeros.astype(np.float32) * group_scales
    return CodeBlocks(
        np.ascontiguousarray(codes, dtype=np.uint8),
        np.ascontiguousarray(group_scales[:, group_of_block].astype(np.float16)),
        np.ascontiguousarray(biases[:, group_of_block].astype(np.float16)),
        bits,
    )


def dequantize(blocks: CodeBlocks) -> np.ndarray:
    """float32 [rows, cols] values of the blocks (the reference for the kernels)."""
    rows, cols = blocks.codes.shape
    codes = blocks.codes.reshape(rows, cols // BLOCK, BLOCK).astype(np.float32)
    scales = blocks.scales.astype(np.float32)[..., None]
    return (codes * scales + blocks.biases.astype(np.float32)[..., None]).reshape(rows, cols)


def scaled_halves(scales: np.ndarray, times: float) -> np.ndarray:
    """float16 scales * times, multiplied in float32 (the biases of codes stored plus a zero point)."""
    # times is a power of two or small integer, so float16 holds scale * times exactly (no overflow
    # for GGUF scales, which are float16 already).
    return (scales.astype(np.float32) * times).astype(np.float16)


def _halves(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16)[:, 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] codes: low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh_bytes: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] bits (bit j of value j)."""
    return np.unpackbits(qh_bytes, axis=1, bitorder="little")


def _q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    scales = _halves(blocks, 0)
    codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, scales, scaled_halves(scales, -128.0), 8


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    scales = _halves(blocks, 0)
    return _nibbles(blocks[:, 2:]), scales, scaled_halves(scales, -8.0), 4


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    return _nibbles(blocks[:, 4:]), _halves(blocks, 0), _halves(blocks, 2), 4


def _q5_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    scales = _halves(blocks, 0)
    codes = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
    return codes, scales, scaled_halves(scales, -16.0), 8


def _q5_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    codes = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
    return codes, _halves(blocks, 0), _halves(blocks, 2), 8


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Super-blocks of 8 sub-blocks of 32: d, dmin, 6-bit scales sc and mins m, then 4-bit codes q;
    w = d * sc * q - dmin * m."""
    scales, biases = _k_scales_biases(blocks)
    return _k_low_nibbles(blocks[:, 16:]), scales, biases, 4


def _q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Q4_K's super-blocks with a 5th bit a value: d, dmin, scales and mins as Q4_K's, 32 bytes of
    high bits (bit i of byte l: value l of sub-block i), then Q4_K's nibbles. 8-bit codes 0..31, as
    Q5_0's and Q5_1's: the kernels read codes of 4 or 8 bits."""
    scales, biases = _k_scales_biases(blocks)
    codes = _k_low_nibbles(blocks[:, 48:])
    sub_blocks, qh = codes.reshape(-1, 8, 32), blocks[:, 16:48]
    for i in range(8):  # bit i of qh moved to bit 4 of sub-block i's codes
        sub_blocks[:, i] |= (qh << (4 - i) if i <= 4 else qh >> (i - 4)) & 0x10
    return codes, scales, biases, 8


# Q3_K: value v of a super-block takes bits 2 * ((v % 128) // 32) of qs byte 32 * (v // 128) + v % 32
# and bit v // 32 of hmask byte v % 32 (llama.cpp's dequantize_row_q3_K).
_Q3_K_VALUES = np.arange(256)
_Q3_K_LOW_SHIFTS = (2 * (_Q3_K_VALUES % 128 // 32)).astype(np.uint8)
_Q3_K_HIGH_SHIFTS = (_Q3_K_VALUES // 32).astype(np.uint8)


def _q3_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Super-blocks of 16 sub-blocks of 16: 32 bytes hmask (a value's 3rd bit), 64 bytes qs (its low 2
    bits), 12 bytes of packed 6-bit scales sc, then d; w = d * (sc - 32) * q with q = low 2 bits, less 4
    where the hmask bit is clear (q in -4..3). p = (sc - 32) * q lies in -124..128 for every sc and q,
    so 128 - p is an 8-bit code (0..252) under the per-32 scale -d: Q8_0's zero point 128, each bias
    128 * d, which float16 holds exactly (up to |d| = 511.75, as Q8_0's -128 * d), and the panels keep
    the scales alone. Exact: the per-16 factors sc - 32 live in the codes, so no product is rounded to
    float16 (Q4_K's d * sc are)."""
    count = len(blocks)
    # Each 32-byte run repeated to the 256 values it serves (whole runs copied at once), then shifted.
    low = np.repeat(np.ascontiguousarray(blocks[:, 32:96]).view("V32"), 4, axis=1).view(np.uint8)
    high = np.repeat(np.ascontiguousarray(blocks[:, :32]).view("V32"), 8, axis=1).view(np.uint8)
    q = (low >> _Q3_K_LOW_SHIFTS) & 3
    q |= ((high >> _Q3_K_HIGH_SHIFTS) & 1) << 2  # q + 4, 0..7
    # 128 - p = 128 + 4 * (sc - 32) - (sc - 32) * (q + 4), in uint8 arithmetic modulo 256: the
    # result lies in 0..252, so it is the true value.
    sc = np.repeat(_q3_k_scales(blocks[:, 96:108]) - np.uint8(32), 16, axis=1)
    codes = np.uint8(128) + (sc << 2)
    codes -= sc * q
    scales = np.repeat(-_halves(blocks, 108), 8).reshape(count, 8)
    return codes, scales, scaled_halves(scales, -128.0), 8


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """[n, 12] bytes -> [n, 16] 6-bit scales: low 4 bits in the nibbles of bytes 0..7 (low nibbles
    sub-blocks 0..7, high ones 8..15), high 2 bits in bytes 8..11 (bits 2k and 2k + 1 of byte 8 + i:
    sub-block 4k + i)."""
    count = len(packed)
    low = (packed[:, None, :8] >> np.array([0, 4], dtype=np.uint8)[:, None]) & 0x0F
    high = (packed[:, None, 8:] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    scales: np.ndarray = low.reshape(count, 16) | (high.reshape(count, 16) << 4)
    return scales


def _k_scales_biases(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's and Q5_K's sub-block scales d * sc and biases -dmin * m ([n, 8] float16 each) from the
    super-blocks' d, dmin and 12 bytes of packed 6-bit sc and m."""
    d = _halves(blocks, 0).astype(np.float32)[:, None]
    dmin = _halves(blocks, 2).astype(np.float32)[:, None]
    packed = blocks[:, 4:16].astype(np.uint8)
    sc = np.empty((len(blocks), 8), dtype=np.uint8)
    mins = np.empty((len(blocks), 8), dtype=np.uint8)
    sc[:, :4] = packed[:, 0:4] & 63
    mins[:, :4] = packed[:, 4:8] & 63
    sc[:, 4:] = (packed[:, 8:12] & 0x0F) | ((packed[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)
    return (d * sc).astype(np.float16), (-dmin * mins).astype(np.float16)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] bytes -> [n, 256] codes: 4 chunks of 64 values, low nibbles then high nibbles."""
    quarters = qs.reshape(-1, 4, 32)
    codes: np.ndarray = np.stack([quarters & 0x0F, quarters >> 4], axis=2).reshape(-1, 256)
    return codes


def _iq4_nl(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """d, then 16 bytes of level indices (low nibbles values 0..15, high ones 16..31): w = d * level."""
    scales = _halves(blocks, 0)
    return _iq4_codes(blocks[:, 2:]), scales, scaled_halves(scales, -128.0), 8


def _iq4_xs(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Super-blocks of 8 sub-blocks of 32: d, the 6-bit scales' high 2 bits (uint16) and low 4 bits
    (4 bytes), then 16 bytes of indices a sub-block as IQ4_NL's; w = d * (ls - 32) * level."""
    d = _halves(blocks, 0).astype(np.float32)[:, None]
    high = blocks[:, 2:4].copy().view(np.uint16)  # [n, 1]
    low = blocks[:, 4:8]
    sub = np.arange(8)
    ls = ((low[:, sub // 2] >> (4 * (sub % 2))) & 0x0F) | (((high >> (2 * sub)) & 3) << 4).astype(np.uint8)
    scales = (d * (ls.astype(np.float32) - 32)).astype(np.float16)  # [n, 8]
    codes = _iq4_codes(blocks[:, 8:].reshape(-1, 16)).reshape(-1, 256)
    return codes, scales, scaled_halves(scales, -128.0), 8


def _iq4_codes(indices: np.ndarray) -> np.ndarray:
    """[n, 16] bytes of 4-bit level indices -> [n, 32] codes level + 128 (1..241)."""
    codes: np.ndarray = (IQ4_LEVELS[_nibbles(indices)] + 128).astype(np.uint8)
    return codes


def _mxfp4(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The exponent byte e, then 16 bytes of e2m1 codes (low nibbles values 0..15, high ones 16..31):
    w = MXFP4_DOUBLED[code] * 2^(e - 128). 8-bit codes MXFP4_DOUBLED + 128 (116..140), Q8_0's zero
    point, under the float16 scale 2^(e - 128); UnrepresentableBlocks where mxfp4_scales has none."""
    doubled = MXFP4_DOUBLED[_nibbles(blocks[:, 1:])]
    scales = mxfp4_scales(blocks[:, 0], np.any(doubled != 0, axis=1))
    return (doubled + 128).astype(np.uint8), scales, scaled_halves(scales, -128.0), 8


def mxfp4_scales(exponents: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    """float16 scales 2^(e - 128) of MXFP4 blocks with exponent bytes `exponents` (uint8 [n]), 0 for
    a block whose values are all zero (`nonzero` False: any scale reads them exactly). Raises
    UnrepresentableBlocks where a block of values has an exponent outside MXFP4_EXPONENTS."""
    wide = exponents.astype(np.int32)
    outside = nonzero & ((wide < MXFP4_EXPONENTS.start) | (wide >= MXFP4_EXPONENTS.stop))
    if outside.any():
        e = int(wide[outside][0])
        raise UnrepresentableBlocks(
            f"MXFP4 exponent byte {e} (a scale of 2^{e - 128}) is outside float16's exact range "
            f"2^{MXFP4_EXPONENTS.start - 128}..2^{MXFP4_EXPONENTS.stop - 1 - 128}"
        )
    powers = np.ldexp(np.float32(1), np.clip(wide, MXFP4_EXPONENTS.start, MXFP4_EXPONENTS.stop - 1) - 128)
    return np.where(nonzero, powers, 0).astype(np.float16)


# The 8-bit codes of each 4-bit index, of the types whose codes are drawn from 16 values.
_IQ4_TABLE = (IQ4_LEVELS + 128).astype(np.uint8)
CODE_TABLES = {"IQ4_NL": _IQ4_TABLE, "IQ4_XS": _IQ4_TABLE, "MXFP4": (MXFP4_DOUBLED + 128).astype(np.uint8)}

_DECODERS = {
    **{"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1},
    **{"Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs},
    "MXFP4": _mxfp4,
}
