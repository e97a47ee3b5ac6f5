"""GGUF blocks decoded to the code blocks the quantized CPU kernels start from (quant_blocks.py),
against gguf's own dequantize: each type the kernels read, whole or a chunk at a time, and split
inside super-blocks; the types they do not read (dense, F16/BF16, Q2_K, Q6_K) become Q8_0 blocks."""

from __future__ import annotations

from dataclasses import astuple

import numpy as np
import pytest
import torch

from batchlm.kernels import cpu_quant, quant_blocks, quant_panels
from batchlm.kernels.dense_blocks import from_dense_q8
from batchlm.kernels.quant_blocks import CodeBlocks, dequantize, from_gguf
from batchlm.layers.quantization.base import QuantizedTensor, columns_of
from batchlm.layers.quantization.cpu_quantized import code_blocks
from cpu_quant_harness import GGUF_TYPES, RNG, gguf, needs_kernel, random_gguf, reference
from gguf_builder import RANDOM_BLOCK_SCALES, random_blocks


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_blocks_decode_like_gguf(type_name: str) -> None:
    raw = random_gguf(type_name, 5, 512)
    blocks = from_gguf(type_name, raw, 5, 512)
    ours, expected = dequantize(blocks), reference(type_name, raw, 5, 512)
    assert blocks.codes.max() < (32 if type_name.startswith("Q5") else 16 if blocks.bits == 4 else 256)
    if type_name in ("Q4_K", "Q5_K"):
        assert np.all(np.abs(ours - expected) <= k_quant_rounding(blocks, expected))
    else:
        assert np.array_equal(ours, expected)


def k_quant_rounding(blocks: CodeBlocks, expected: np.ndarray) -> np.ndarray:
    """How far a K-quant's code blocks may read from the file's values: their float16 scales d * sc
    and biases -dmin * m are within 2^-11 of the products (2^-25 where subnormal), and both sides
    compute scale * code + bias in float32."""
    rows, cols = blocks.codes.shape
    codes = blocks.codes.reshape(rows, -1, 32).astype(np.float32)
    scales = np.abs(blocks.scales.astype(np.float32))[..., None]
    biases = np.abs(blocks.biases.astype(np.float32))[..., None]
    bound = 2.0**-11 * (scales * codes + biases) + 2.0**-25 * (codes + 1)
    return bound.reshape(rows, cols) + 2.0**-22 * np.abs(expected)


@pytest.mark.parametrize("type_name", [*GGUF_TYPES, "IQ4_NL", "IQ4_XS"])
def test_blocks_decode_the_same_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch, type_name: str) -> None:
    """from_gguf decodes CHUNK_VALUES at a time (a chunk's temporaries in cache), in whole rows: chunks
    of a row (a chunk smaller than a row still takes one) give the blocks of one pass."""
    if type_name in RANDOM_BLOCK_SCALES:
        raw = random_blocks((5, 768), type_name, np.random.default_rng(2))
    else:
        raw = random_gguf(type_name, 5, 768)
    whole = from_gguf(type_name, raw, 5, 768)
    for chunk_values in (256, 1024):
        monkeypatch.setattr(quant_blocks, "CHUNK_VALUES", chunk_values)
        chunked = from_gguf(type_name, raw, 5, 768)
        assert chunked.bits == whole.bits
        for ours, expected in zip(astuple(chunked), astuple(whole), strict=True):
            assert np.array_equal(ours, expected)


def test_q5_k_blocks_hold_the_file_values_and_split_inside_super_blocks() -> None:
    """A Q5_K_M file's main type (random blocks of realistic scales), read as 8-bit codes 0..31 with
    Q4_K's float16 sub-block scales and biases; a tensor-parallel share inside its 256-value
    super-blocks is those columns of the whole."""
    rows, cols = 48, 1024
    raw = random_blocks((rows, cols), "Q5_K", np.random.default_rng(1))
    blocks = from_gguf("Q5_K", raw, rows, cols)
    assert blocks.bits == 8 and blocks.codes.max() == 31
    ours, expected = dequantize(blocks), reference("Q5_K", raw, rows, cols)
    assert np.all(np.abs(ours - expected) <= k_quant_rounding(blocks, expected))
    whole = QuantizedTensor("Q5_K", torch.from_numpy(raw), cols, 256, 176)
    share = code_blocks(columns_of(whole, 160, 128))
    assert share.bits == 8 and np.array_equal(dequantize(share), ours[:, 160:288])


def test_q3_k_blocks_are_the_file_values_exactly_and_split_inside_super_blocks() -> None:
    """Q3_K as 8-bit codes 128 - (sc - 32) * q under the scale -d, biases 128 * d: bit for bit gguf's
    values, at the ends of every field too (sc 0 and 63 with q -4 and 3; d zero, negative, subnormal,
    the largest whose bias float16 holds, a full significand); Q8_0's zero point, so the panels keep
    the scales alone; a tensor-parallel share inside the 256-value super-blocks is those columns of
    the whole."""
    rows, cols = 8, 1024
    raw = random_blocks((rows, cols), "Q3_K", np.random.default_rng(3))
    blocks_of = raw.reshape(-1, 110)
    ends = np.array([0.0, -0.0, 511.75, -511.75, 2.0**-24, -(2.0**-14), 1 - 2.0**-11], dtype=np.float16)
    blocks_of[: len(ends), 108:] = ends.view(np.uint8).reshape(-1, 2)
    blocks_of[7:9, 96:108] = 0  # every sc 0: sc - 32 = -32
    blocks_of[9:11, 96:108] = 0xFF  # every sc 63: 31
    blocks_of[7, :32] = blocks_of[9, :32] = 0  # q -4 everywhere: codes 0 and 252
    blocks_of[8, :32] = blocks_of[10, :32] = 0xFF  # ... and 3 where the low bits are 3
    blocks_of[8, 32:96] = blocks_of[10, 32:96] = 0xFF
    blocks = from_gguf("Q3_K", raw, rows, cols)
    assert blocks.bits == 8 and blocks.codes.min() == 0 and blocks.codes.max() == 252
    assert np.array_equal(dequantize(blocks), reference("Q3_K", raw, rows, cols))
    assert quant_panels.symmetric_zero(blocks) == 128
    whole = QuantizedTensor("Q3_K", torch.from_numpy(raw), cols, 256, 110)
    share = code_blocks(columns_of(whole, 160, 128))
    for ours, expected in zip(astuple(share), astuple(quant_blocks.columns(blocks, 160, 128)), strict=True):
        assert np.array_equal(ours, expected)


def test_dense_q8_matches_gguf_q8_0() -> None:
    weight = RNG.standard_normal((7, 96)).astype(np.float32)
    ours = dequantize(from_dense_q8(weight))
    q8_0 = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(ours, reference("Q8_0", q8_0, 7, 96))


@pytest.mark.parametrize("chunk_values", [96, 200, 1 << 19])
def test_dense_q8_in_row_chunks_matches_gguf_q8_0(monkeypatch: pytest.MonkeyPatch, chunk_values: int) -> None:
    """One row, two rows and a remainder, and the whole weight a chunk: the same codes and scales."""
    monkeypatch.setattr(quant_blocks, "CHUNK_VALUES", chunk_values)
    weight = RNG.standard_normal((7, 96)).astype(np.float32)
    weight[3] = 0.0  # an all-zero row: scale 0, codes 128
    q8_0 = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(dequantize(from_dense_q8(weight)), reference("Q8_0", q8_0, 7, 96))


# Where each K-quant the kernels do not read keeps its float16 scales (d, then dmin where it has one).
K_QUANT_SCALE_BYTES = {"Q2_K": slice(80, 84)}


@pytest.mark.parametrize("type_name", sorted(K_QUANT_SCALE_BYTES))
def test_an_unread_gguf_type_becomes_q8_0_row_chunk_by_row_chunk(
    monkeypatch: pytest.MonkeyPatch, type_name: str
) -> None:
    """A type the kernels do not read and no native pass converts (Q2_K; Q6_K has its own,
    tested below) is dequantized and requantized a few rows at a time; the result is the Q8_0 of the
    whole tensor's values."""
    monkeypatch.setattr(quant_blocks, "CHUNK_VALUES", 512)
    rows, cols = 9, 256
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, (rows * cols // block_size, block_bytes), dtype=np.uint8)
    scale_bytes = K_QUANT_SCALE_BYTES[type_name]
    halves = (scale_bytes.stop - scale_bytes.start) // 2
    # Its float16 scales small and finite.
    blocks[:, scale_bytes] = RNG.uniform(-0.01, 0.01, (len(blocks), halves)).astype(np.float16).view(np.uint8)
    raw = blocks.reshape(rows, -1)
    tensor = QuantizedTensor(type_name, torch.from_numpy(raw), cols, *gguf.GGML_QUANT_SIZES[qtype])
    blocks = code_blocks(tensor)
    whole = from_dense_q8(gguf.quants.dequantize(raw, qtype).reshape(rows, cols))
    assert np.array_equal(blocks.codes, whole.codes) and np.array_equal(blocks.scales, whole.scales)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_tensor_becomes_the_q8_0_of_its_values(dtype: torch.dtype) -> None:
    """An F16 or BF16 GGUF tensor in a quantized layer (loaded as that torch dtype) becomes the Q8_0
    of its values, exactly as gguf quantizes them."""
    values = torch.from_numpy(RNG.standard_normal((7, 96)).astype(np.float32)).to(dtype)
    blocks = code_blocks(values)
    widened = values.float().numpy()
    q8_0 = gguf.quants.quantize(widened, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(dequantize(blocks), reference("Q8_0", q8_0, 7, 96))


@needs_kernel
def test_q6_k_converts_natively_to_the_numpy_q8_0_bit_for_bit() -> None:
    """The native Q6_K -> Q8_0 pass gives the codes and float16 steps of dequantizing (gguf's reference)
    and quantizing in numpy: random blocks, one all-zero block, one with the largest float16 d."""
    rows, cols = 6, 512
    qtype = gguf.GGMLQuantizationType.Q6_K
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, (rows * cols // block_size, block_bytes), dtype=np.uint8)
    blocks[:, -2:] = RNG.uniform(-0.01, 0.01, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    blocks[3, -2:] = 0  # d = 0: every value 0, step 0, codes 128
    blocks[5, -2:] = np.array([65504.0], dtype=np.float16).view(np.uint8)  # steps beyond float16: inf
    raw = blocks.reshape(rows, -1)
    native = cpu_quant.q6_k_as_q8(raw, rows, cols)
    assert native is not None
    with np.errstate(over="ignore"):  # the last block's steps overflow float16 on purpose
        expected = from_dense_q8(gguf.quants.dequantize(raw, qtype).reshape(rows, cols))
    assert np.array_equal(native.codes, expected.codes)
    assert np.array_equal(native.scales.view(np.uint16), expected.scales.view(np.uint16))
    assert np.array_equal(native.biases.view(np.uint16), expected.biases.view(np.uint16))
