"""The quantized CPU kernels (kernels/cpu_quant_kernels.c via cpu_quant.py) on packed panels, on each
instruction path, against a float32 matmul of the dequantized weight; a fused weight of two code
widths packed as parts.

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

import numpy as np
import pytest
import torch

from batchlm.kernels import cpu_native, cpu_quant, quant_panels
from batchlm.kernels.dense_blocks import from_dense_q8
from batchlm.kernels.quant_blocks import CodeBlocks, from_gguf
from batchlm.layers.quantization.cpu_quantized import QuantizedStore
from cpu_isa import kernel_path
from cpu_quant_harness import GGUF_TYPES, RNG, needs_kernel, random_gguf, reference


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
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0", "Q3_K", "MXFP4"])
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
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q5_1", "Q5_K", "Q3_K", "MXFP4"])
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
