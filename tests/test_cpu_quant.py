"""The quantized CPU kernels (kernels/cpu_quant_kernels.c via cpu_quant.py) and the GGUF block decoding
they start from (quant_blocks.py), against gguf's own dequantize and a float32 matmul.

Tolerances: against the dequantized weight times the kernels' block-quantized activations
(`quantized_activations`) the kernels differ only by float32 rounding (another summation order, and
scale * dot + bias * sum per block), so by 1e-5 of the sum of the terms' magnitudes; except that
rarely an activation code lands one step away (x * 127 / max within an ulp of a rounding boundary).
Against the float activations, each block of x is rounded twice (its codes, then the codes of what
they left over), to about 1/254^2 of its largest magnitude: an output's error is a sum of K
independent rounding errors, std ~ sqrt(K) * (amax / 254^2 / sqrt(3)) * |w|, about 1e-4 of the
output's spread here; the test allows 1e-3 of the largest output (one int8 pass alone is ~1e-2).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import astuple

import numpy as np
import pytest
import torch

from batchlm.kernels import cpu_native, cpu_quant, quant_blocks, quant_panels
from batchlm.kernels.quant_blocks import CodeBlocks, dequantize, from_dense_q8, from_gguf
from batchlm.layers.quantization.base import QuantizedTensor, columns_of
from batchlm.layers.quantization.cpu_quantized import QuantizedStore, code_blocks
from cpu_isa import kernel_path
from gguf_builder import RANDOM_BLOCK_SCALES, random_blocks

gguf = pytest.importorskip("gguf")
needs_kernel = pytest.mark.skipif(cpu_quant.quant_library() is None, reason="no AVX2 CPU or C compiler here")
RNG = np.random.default_rng(0)
GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K"]
# Where each type's float16 scales lie in its block (d, then dmin where it has one): offset, count.
SCALE_FIELDS = {
    **{"Q8_0": (0, 1), "Q4_0": (0, 1), "Q5_0": (0, 1), "Q4_1": (0, 2), "Q5_1": (0, 2)},
    **{"Q3_K": (108, 1), "Q4_K": (0, 2), "Q5_K": (0, 2)},
}


def random_gguf(type_name: str, rows: int, cols: int) -> np.ndarray:
    """Random bytes as GGUF blocks of `type_name`, with their float16 scales made small and finite."""
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, (rows * cols // block_size, block_bytes), dtype=np.uint8)
    at, halves = SCALE_FIELDS[type_name]
    scales = RNG.uniform(-0.02, 0.02, (len(blocks), halves)).astype(np.float16)
    blocks[:, at : at + 2 * halves] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def reference(type_name: str, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    return gguf.quants.dequantize(raw, qtype).reshape(rows, cols)


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


def test_a_weight_loaded_whole_keeps_its_blocks_and_packs_as_one_loaded_in_parts() -> None:
    codes = RNG.integers(0, 16, (40, 64), dtype=np.uint8)
    scales = RNG.uniform(0, 1, (40, 2)).astype(np.float16)
    blocks = CodeBlocks(codes, scales, -scales, 4)
    whole = QuantizedStore(40, 64)
    whole.put(0, blocks)
    assert whole.codes is not None and np.shares_memory(whole.codes, codes)  # no copy of the codes
    parts = QuantizedStore(40, 64)
    for start, stop in ((0, 16), (16, 40)):
        parts.put(start, CodeBlocks(codes[start:stop], scales[start:stop], -scales[start:stop], 4))
    assert torch.equal(whole.finish().data, parts.finish().data)
    assert whole.codes is None  # released once packed
    # Rows no shard wrote stay zero: scale and bias 0.
    half = QuantizedStore(40, 64)
    half.put(8, CodeBlocks(codes[8:24], scales[8:24], -scales[8:24], 4))
    values = quant_panels.dequantize_packed(half.finish())
    assert torch.count_nonzero(values[:8]) == 0 and torch.count_nonzero(values[24:40]) == 0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("pack_panels", [1, 2, 16])
def test_packing_panel_chunks_gives_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, bits: int, pack_panels: int
) -> None:
    codes = RNG.integers(0, 2**bits, (37, 64), dtype=np.uint8)
    scales = RNG.uniform(0, 1, (37, 2)).astype(np.float16)
    blocks = CodeBlocks(codes, scales, -scales, bits)
    whole = quant_panels.pack(blocks)
    monkeypatch.setattr(quant_panels, "PACK_PANELS", pack_panels)
    assert torch.equal(quant_panels.pack(blocks).data, whole.data)


@pytest.mark.parametrize("bits", [8, 4])
def test_pack_round_trips(bits: int) -> None:
    codes = RNG.integers(0, 2**bits, (37, 64), dtype=np.uint8)
    scales = RNG.uniform(0, 1, (37, 2)).astype(np.float16)
    blocks = CodeBlocks(codes, scales, -scales, bits)
    packed = quant_panels.pack(blocks)
    assert packed.data.shape == (3, 2 * (64 + (512 if bits == 8 else 256)))
    assert torch.equal(quant_panels.dequantize_packed(packed), torch.from_numpy(dequantize(blocks)))


@pytest.mark.parametrize(
    "type_name,zero",
    [
        *[("Q8_0", 128), ("Q4_0", 8), ("Q5_0", 16), ("Q4_1", 0), ("Q5_1", 0)],
        *[("Q3_K", 128), ("Q4_K", 0), ("Q5_K", 0)],
    ],
)
def test_symmetric_formats_pack_their_scales_alone(type_name: str, zero: int) -> None:
    blocks = from_gguf(type_name, random_gguf(type_name, 37, 512), 37, 512)
    packed, stored = quant_panels.pack(blocks), quant_panels.pack(blocks, omit_biases=False)
    assert packed.zero == zero and stored.zero == 0
    code_bytes = 16 * 32 // (2 if blocks.bits == 4 else 1)
    panel_bytes = 16 * 32 + 16 * code_bytes if zero else 16 * (64 + code_bytes)  # 16 blocks a panel
    assert packed.data.shape == (3, panel_bytes)
    if zero:
        assert packed.nbytes == stored.nbytes - 3 * 16 * 32
    for weight in (packed, stored):
        assert torch.equal(quant_panels.dequantize_packed(weight), torch.from_numpy(dequantize(blocks)))


def test_biases_the_scales_do_not_give_bit_for_bit_are_stored() -> None:
    codes = RNG.integers(0, 256, (20, 96), dtype=np.uint8)
    scales = RNG.uniform(0.001, 0.02, (20, 3)).astype(np.float16)
    biases = (scales.astype(np.float32) * -128).astype(np.float16)
    assert quant_panels.pack(CodeBlocks(codes, scales, biases, 8)).zero == 128
    off_by_an_ulp = biases.copy()
    off_by_an_ulp.view(np.uint16)[7, 1] += 1
    assert quant_panels.pack(CodeBlocks(codes, scales, off_by_an_ulp, 8)).zero == 0
    # -128 * 600 overflows float16: the stored bias is -inf, the computed one finite.
    large = np.full((20, 3), 600, dtype=np.float16)
    assert quant_panels.pack(CodeBlocks(codes, large, np.full_like(large, -np.inf), 8)).zero == 0
    # Padding rows (scale and bias 0) fit any zero point; a width of 3 blocks pads the scale rows.
    packed = quant_panels.pack(CodeBlocks(codes, scales, biases, 8))
    assert packed.data.shape == (2, 128 + 3 * 512)


@pytest.fixture(params=["auto", "avx512", "avx2"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each kernel test runs on the CPU's best path (AMX tiles where it has them), on AVX-512 VNNI
    without tiles, and on the AVX2 path."""
    with kernel_path(request.param):
        yield request.param


@needs_kernel
@pytest.mark.parametrize("type_name", GGUF_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 70])
@pytest.mark.parametrize("out_features,in_features", [(16, 256), (37, 512), (5, 1536)])
def test_matmul_matches_dequantized(
    isa: str, type_name: str, rows: int, out_features: int, in_features: int
) -> None:
    raw = random_gguf(type_name, out_features, in_features)
    weight = quant_panels.pack(from_gguf(type_name, raw, out_features, in_features))
    dense = torch.from_numpy(reference(type_name, raw, out_features, in_features))
    x = torch.randn(rows, in_features, dtype=torch.float32) * 3
    bias = torch.randn(out_features)
    out = cpu_quant.quant_linear(x, weight, bias)
    assert out.shape == (rows, out_features)
    activations, dequantized = cpu_quant.quantized_activations(x), quant_panels.dequantize_packed(weight)
    exact = activations @ dequantized.t() + bias
    # float32 rounding of a sum scales with the sum of the magnitudes of its terms
    tight = 1e-5 * (activations.abs() @ dequantized.abs().t() + bias.abs()) + 1e-6
    # ... and a product x * (127 / max) one ulp off a rounding boundary moves one code by one step
    one_step = x.abs().amax() / 127 * dequantized.abs().amax(dim=1)
    error = (out - exact).abs()
    assert (error <= tight + one_step).all()
    float_path = x @ dense.t() + bias
    assert (out - float_path).abs().max() <= 1e-3 * float_path.abs().max()


@needs_kernel
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0", "Q3_K"])
@pytest.mark.parametrize("rows", [1, 3, 8, 70])
def test_panels_without_biases_give_the_bits_of_panels_with_them(isa: str, type_name: str, rows: int) -> None:
    blocks = from_gguf(type_name, random_gguf(type_name, 37, 512), 37, 512)
    packed, stored = quant_panels.pack(blocks), quant_panels.pack(blocks, omit_biases=False)
    assert packed.zero and not stored.zero
    x, bias = torch.randn(rows, 512) * 3, torch.randn(37)
    assert torch.equal(cpu_quant.quant_linear(x, packed, bias), cpu_quant.quant_linear(x, stored, bias))
    ids = torch.tensor([0, 15, 16, 36])
    assert torch.equal(cpu_quant.quant_rows(packed, ids), cpu_quant.quant_rows(stored, ids))


def _shards(widths: list[tuple[int, int]]) -> list[CodeBlocks]:
    """Random code blocks of (rows, bits) each, 512 inputs wide."""
    shards = []
    for rows, bits in widths:
        codes = RNG.integers(0, 2**bits, (rows, 512), dtype=np.uint8)
        scales = RNG.uniform(0.001, 0.02, (rows, 16)).astype(np.float16)
        shards.append(CodeBlocks(codes, scales, RNG.uniform(-0.1, 0.1, (rows, 16)).astype(np.float16), bits))
    return shards


def _stored(shards: list[CodeBlocks], keep_parts: bool) -> QuantizedStore:
    starts = list(itertools.accumulate((shard.codes.shape[0] for shard in shards), initial=0))
    weight = QuantizedStore(starts[-1], 512, keep_parts=keep_parts)
    for start, shard in reversed(list(zip(starts[:-1], shards, strict=True))):  # loads come in any order
        weight.put(start, shard)
    return weight


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_a_fused_weight_of_two_code_widths_packs_as_parts_with_the_widened_results(
    isa: str, rows: int
) -> None:
    # q and k in 4 bits, v in 8 (a Q4_K_M file's Q6_K values): two parts, no 4-bit codes widened.
    shards = _shards([(64, 4), (32, 4), (48, 8)])
    parted, widened = _stored(shards, True).finish(), _stored(shards, False).finish()
    assert isinstance(parted, quant_panels.PartedWeight) and isinstance(widened, quant_panels.QuantizedWeight)
    assert [(part.bits, part.out_features) for part in parted.parts] == [(4, 96), (8, 48)]
    assert parted.out_features == 144 and parted.nbytes < widened.nbytes
    x, bias = torch.randn(rows, 512) * 3, torch.randn(144)
    ours, theirs = cpu_quant.quant_linear(x, parted, bias), cpu_quant.quant_linear(x, widened, bias)
    if isa == "avx2":  # its 8-bit path re-centres the codes and folds 128 * scale into the bias
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    else:  # the same integer sums and epilogue
        assert torch.equal(ours, theirs)


def test_shards_off_the_panels_or_too_many_widen_to_one_form() -> None:
    off_panel = _stored(_shards([(40, 4), (24, 8)]), True).finish()
    assert isinstance(off_panel, quant_panels.QuantizedWeight) and off_panel.bits == 8
    too_many = _stored(_shards([(16, 4), (16, 8), (16, 4), (16, 8)]), True).finish()
    assert isinstance(too_many, quant_panels.QuantizedWeight) and too_many.bits == 8
    same_width = _stored(_shards([(16, 4), (32, 4)]), True).finish()
    assert isinstance(same_width, quant_panels.QuantizedWeight) and same_width.bits == 4
    with pytest.raises(TypeError):
        _stored(_shards([(16, 4), (16, 8)]), True).finish_whole()


needs_amx = pytest.mark.skipif(
    cpu_quant.quant_library() is None or not cpu_quant.use_amx(), reason="no AMX tiles on this CPU (or OS)"
)


@needs_amx
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [8, 9, 16, 23, 64, 300])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("in_features", [1024, 32, 64])
def test_amx_tiles_give_the_vnni_paths_bits(bits: int, rows: int, symmetric: bool, in_features: int) -> None:
    """The tile path sums the same integers and runs the VNNI path's float epilogue, so its outputs are
    the same bits; rows past a whole tile (8 activation rows) and past a 256-row block are padding,
    and a weight of one or two blocks a row is shorter than the tile products run ahead."""
    blocks = in_features // 32
    codes = RNG.integers(0, 2**bits, (53, in_features), dtype=np.uint8)
    scales = RNG.uniform(-0.02, 0.02, (53, blocks)).astype(np.float16)
    biases = RNG.uniform(-0.02, 0.02, (53, blocks)).astype(np.float16)
    if symmetric:
        biases = (scales.astype(np.float32) * -8).astype(np.float16)
    weight = quant_panels.pack(CodeBlocks(codes, scales, biases, bits))
    assert weight.zero == (8 if symmetric else 0)
    x, bias = torch.randn(rows, in_features) * 3, torch.randn(53)
    with kernel_path("auto"):
        assert cpu_quant.quant_isa() == cpu_quant.ISA_AMX
        tiles = cpu_quant.quant_linear(x, weight, bias), cpu_quant.quant_linear(x, weight)
    with kernel_path("avx512"):
        assert cpu_quant.quant_isa() == cpu_quant.ISA_AVX512
        vnni = cpu_quant.quant_linear(x, weight, bias), cpu_quant.quant_linear(x, weight)
    assert torch.equal(tiles[0], vnni[0]) and torch.equal(tiles[1], vnni[1])


@needs_kernel
def test_a_compiler_without_amx_intrinsics_builds_the_other_paths(tmp_path) -> None:
    # GCC before 11 and clang before 12 have no AMX intrinsics: the library builds without the tile
    # path (as -DBATCHLM_NO_AMX makes any compiler do here), says it has none, and still multiplies.
    import ctypes

    path = cpu_native.build_library(
        tmp_path, cpu_quant.SOURCE_PATH, (*cpu_native.COMPILE_FLAGS, "-DBATCHLM_NO_AMX")
    )
    library = ctypes.CDLL(str(path))
    assert library.batchlm_quant_has_amx() == 0
    weight = quant_panels.pack(from_dense_q8(RNG.standard_normal((19, 64)).astype(np.float32)))
    x = torch.randn(16, 64)
    out = torch.empty(16, 19)
    assert library.batchlm_quant_linear(
        ctypes.c_void_p(x.data_ptr()), ctypes.c_long(64), ctypes.byref(quant_panels.parts_of(weight)), None,
        ctypes.c_void_p(out.data_ptr()), ctypes.c_long(16), ctypes.c_long(19), ctypes.c_long(64), 1,
        cpu_quant.ISA_AVX512 if cpu_quant.use_avx512() else cpu_quant.ISA_AVX2,
    ) == 0  # fmt: skip
    with kernel_path("avx512" if cpu_quant.use_avx512() else "avx2"):
        assert torch.equal(out, cpu_quant.quant_linear(x, weight))


@needs_kernel
@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_a_rows_result_depends_on_neither_the_thread_count_nor_its_batch(isa: str, type_name: str) -> None:
    """Threads split the output panels, never a sum, and each activation row is quantized and summed
    on its own: any thread count and any batch around a row give that row the same bits."""
    weight = quant_panels.pack(from_gguf(type_name, random_gguf(type_name, 37, 512), 37, 512))
    x = torch.randn(70, 512) * 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [cpu_quant.quant_linear(x[row : row + 1], weight) for row in (0, 9, 69)]
        one_thread = cpu_quant.quant_linear(x, weight)
        torch.set_num_threads(3)
        three_threads = cpu_quant.quant_linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, three_threads)
    for row, result in zip((0, 9, 69), alone, strict=True):
        assert torch.equal(result[0], one_thread[row])


@needs_kernel
def test_matmul_keeps_leading_dims_and_empty_batches(isa: str) -> None:
    weight = quant_panels.pack(from_dense_q8(RNG.standard_normal((19, 64)).astype(np.float32)))
    assert cpu_quant.quant_linear(torch.randn(2, 3, 64), weight).shape == (2, 3, 19)
    assert cpu_quant.quant_linear(torch.randn(0, 64), weight).shape == (0, 19)


@needs_kernel
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q5_1", "Q5_K", "Q3_K"])
def test_rows_are_the_dequantized_rows(type_name: str) -> None:
    raw = random_gguf(type_name, 40, 256)
    weight = quant_panels.pack(from_gguf(type_name, raw, 40, 256))
    ids = torch.tensor([[0, 39], [17, 17]])
    rows = cpu_quant.quant_rows(weight, ids)
    assert torch.equal(rows, quant_panels.dequantize_packed(weight)[ids])


def test_disabled_kernels_leave_no_library(monkeypatch: pytest.MonkeyPatch) -> None:
    caches = (
        cpu_native.native_library,
        cpu_quant._raw_library,
        cpu_quant.quant_library,
        cpu_quant.use_avx512,
        cpu_quant.use_amx,
    )
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "0")
    for cached in caches:
        cached.cache_clear()
    try:
        assert cpu_quant.quant_library() is None and not cpu_quant.use_avx512() and not cpu_quant.use_amx()
        with pytest.raises(RuntimeError, match="not available"):
            cpu_quant.quant_linear(
                torch.randn(1, 32), quant_panels.pack(from_dense_q8(np.ones((1, 32), np.float32)))
            )
    finally:
        monkeypatch.delenv(cpu_native.DISABLE_ENV)
        for cached in caches:
            cached.cache_clear()
