"""The decode-sized quantized linears (1..16 rows): the FP8 kernel that reads 16-bit activations
(kernels/fp8_gemv.py) and the one-row W4A16 GEMV (kernels/w4a16_gemv.py), every launch shape start-up
may pick, against float32 products with the dequantized weight, and the kernels inside a CUDA graph
(the layer methods' dispatch by row count: test_decode_linear_layers.py).

GPU only (marked `gpu`); TRITON_INTERPRET=1 runs the kernel cases on the CPU in fp32 and fp16 (the
interpreter's bf16 dot is broken); the dispatch and graph cases need a GPU.

Tolerances (max abs error over the largest |reference|): both kernels multiply the exact weight
values (e4m3 codes are exact in 16 bits; the 4-bit codes are rebuilt exactly in fp32) and accumulate
in fp32, so only the output's rounding and summation order differ: fp32 1e-5, fp16 2e-3, bf16 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from devices import HALF, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from int4_cases import DEVICE, assert_relative  # noqa: E402
from int4_cases import random_packed as random_packed_with_codes  # noqa: E402

from batchlm.kernels.decode_plans import GemvConfig  # noqa: E402
from batchlm.kernels.fp8_gemv import candidate_configs, fp8_small_m  # noqa: E402
from batchlm.kernels.fused_ops import rms_norm, silu_and_mul  # noqa: E402
from batchlm.kernels.int4_pack import PackedInt4, dequantize_packed  # noqa: E402
from batchlm.kernels.one_row_gemv import one_row_configs, one_row_linear  # noqa: E402
from batchlm.kernels.pdl import ENV_FLAG, pdl_enabled  # noqa: E402
from batchlm.kernels.split_k import SCRATCH  # noqa: E402
from batchlm.kernels.w4a16_gemm import W4A16Config, w4a16_matmul  # noqa: E402
from batchlm.kernels.w4a16_gemv import candidate_plans, w4a16_gemv  # noqa: E402
from batchlm.layers.quantization.forms import quantize_fp8_rows  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_packed(out_features: int, in_features: int, group: int, seed: int = 0) -> PackedInt4:
    # Zero points 0-16 here (the other kernel tests draw 0-15).
    return random_packed_with_codes(out_features, in_features, group, HALF, seed, zero_limit=17)[0]


def fp8_case(
    out_features: int, in_features: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K], row scales [1, N], the float32 weight they stand for)."""
    generator = torch.Generator().manual_seed(seed)
    weight = quantize_fp8_rows(torch.randn(out_features, in_features, generator=generator).to(DEVICE) * 0.05)
    return weight.data, weight.scale[None, :].contiguous(), weight.dequantize()


# One row: the start-up candidates and the variants beside them (split-K that leaves splits with a
# short tail or nothing, a vector activation load, one warp per program row).
ONE_ROW_FP8_CONFIGS = [
    *candidate_configs(True),
    GemvConfig(8, 256, 4, 1, split_k=3),
    GemvConfig(32, 128, 4, 1, split_k=8, x_vector=True),
    GemvConfig(4, 256, 2, 1, split_k=2, x_vector=True),
    GemvConfig(2, 512, 2, 1, split_k=5),
]
FP8_LAUNCHES = [(config, 1) for config in ONE_ROW_FP8_CONFIGS] + [(c, 7) for c in candidate_configs(False)]


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize(("out_features", "in_features"), [(72, 300), (130, 2056)])
def test_fp8_kernel_matches_the_dequantized_weight(
    dtype: torch.dtype, rows: int, out_features: int, in_features: int
) -> None:
    data, scale, dense = fp8_case(out_features, in_features)
    x = torch.randn(rows, in_features, device=DEVICE).to(dtype)
    bias = torch.randn(out_features, device=DEVICE).to(dtype)
    ref = x.float() @ dense.t() + bias.float()
    out = fp8_small_m(x, data, scale, bias)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    assert_relative(out, ref, TOLERANCE[dtype])


@pytest.mark.parametrize(("config", "rows"), FP8_LAUNCHES, ids=repr)
def test_every_fp8_launch_shape_agrees(config: GemvConfig, rows: int) -> None:
    # 1000 inputs: no K tile size divides them, so every shape runs a masked tail.
    data, scale, dense = fp8_case(200, 1000, seed=1)
    x = torch.randn(rows, 1000, device=DEVICE).to(HALF)
    bias = torch.randn(200, device=DEVICE).to(HALF)
    ref = x.float() @ dense.t() + bias.float()
    assert_relative(fp8_small_m(x, data, scale, bias, config), ref, TOLERANCE[HALF])


def test_fp8_split_launches_leave_their_counters_at_zero_for_the_next() -> None:
    data, scale, dense = fp8_case(72, 2048, seed=5)
    x = torch.randn(1, 2048, device=DEVICE).to(HALF)
    split = GemvConfig(16, 256, 4, 1, split_k=4)
    first = fp8_small_m(x, data, scale, None, split)
    assert int(SCRATCH.buffers[x.device][1].abs().sum()) == 0
    torch.testing.assert_close(fp8_small_m(x, data, scale, None, split), first, atol=0, rtol=0)
    assert_relative(first, x.float() @ dense.t(), TOLERANCE[HALF])


def test_fp8_kernel_rejects_too_many_rows_and_a_wrong_width() -> None:
    data, scale, _ = fp8_case(32, 64)
    with pytest.raises(ValueError, match="must be"):
        fp8_small_m(torch.zeros(17, 64, device=DEVICE, dtype=HALF), data, scale)
    with pytest.raises(ValueError, match="must be"):
        fp8_small_m(torch.zeros(1, 32, device=DEVICE, dtype=HALF), data, scale)


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize(("out_features", "in_features"), [(72, 300), (200, 1000), (130, 2056)])
def test_one_row_kernel_on_16_and_32_bit_weights_matches_the_product(
    dtype: torch.dtype, out_features: int, in_features: int
) -> None:
    generator = torch.Generator().manual_seed(out_features)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(DEVICE, dtype)
    x = torch.randn(1, in_features, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(out_features, generator=generator).to(DEVICE, dtype)
    ref = x.float() @ weight.float().t() + bias.float()
    for config in one_row_configs(weight.element_size()):
        out = one_row_linear(x, weight, None, bias, config)
        assert out.dtype == dtype and out.shape == (1, out_features)
        assert_relative(out, ref, TOLERANCE[dtype])
    with pytest.raises(ValueError, match="must be"):
        one_row_linear(torch.zeros(2, in_features, device=DEVICE, dtype=dtype), weight, None, None, config)


@pytest.mark.parametrize("weight_kind", ["16-bit", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_a_gated_input_gives_the_bits_of_silu_and_mul_then_the_product(
    dtype: torch.dtype, weight_kind: str
) -> None:
    # The kernel makes silu(gate) * up as SiLU-and-mul does, rounded to the activations' dtype, so the
    # fused down projection changes no bit of the unfused one, for every launch shape.
    out_features, inter = 130, 1000
    generator = torch.Generator().manual_seed(11)
    gate_up = (torch.randn(1, 2 * inter, generator=generator) * 3).to(DEVICE, dtype)
    bias = torch.randn(out_features, generator=generator).to(DEVICE, dtype)
    if weight_kind == "fp8":
        weight, scale, _ = fp8_case(out_features, inter, seed=12)
        configs = [*ONE_ROW_FP8_CONFIGS, GemvConfig(16, 512, 4, 1, x_vector=True)]
    else:
        weight = (torch.randn(out_features, inter, generator=generator) * 0.05).to(DEVICE, dtype)
        scale, configs = None, [*one_row_configs(weight.element_size()), GemvConfig(4, 256, 2, 1, split_k=3)]
    activated = silu_and_mul(gate_up)
    for config in configs:
        unfused = one_row_linear(activated, weight, scale, bias, config)
        fused = one_row_linear(gate_up, weight, scale, bias, config, gated=True)
        torch.testing.assert_close(fused, unfused, atol=0, rtol=0, msg=repr(config))
    if weight_kind == "fp8":
        torch.testing.assert_close(
            fp8_small_m(gate_up, weight, scale, bias, gated=True),
            fp8_small_m(activated, weight, scale, bias),
            atol=0,
            rtol=0,
        )
        with pytest.raises(ValueError, match="one row"):
            fp8_small_m(gate_up.expand(2, -1).contiguous(), weight, scale, bias, gated=True)
    with pytest.raises(ValueError, match="must be"):
        one_row_linear(activated, weight, scale, bias, configs[0], gated=True)


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize(
    ("out_features", "in_features", "group"),
    [(96, 256, 32), (200, 512, 128), (72, 1152, 64), (40, 4224, 128)],
)
def test_w4a16_gemv_matches_the_dequantized_weight(
    dtype: torch.dtype, out_features: int, in_features: int, group: int
) -> None:
    packed = random_packed(out_features, in_features, group)
    x = torch.randn(1, in_features, device=DEVICE).to(dtype)
    bias = torch.randn(out_features, device=DEVICE).to(dtype)
    ref = x.float() @ dequantize_packed(packed).t() + bias.float()
    out = w4a16_gemv(x, packed, bias)
    assert out.dtype == dtype and out.shape == (1, out_features)
    assert_relative(out, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("one_row", [True, False])
def test_every_w4a16_decode_plan_agrees(one_row: bool) -> None:
    # 1152 inputs (9 groups of 128): the one-row tiles of 256..1024 codes leave a masked tail.
    packed = random_packed(136, 1152, 128, seed=2)
    rows = 1 if one_row else 11
    x = torch.randn(rows, 1152, device=DEVICE).to(HALF)
    ref = x.float() @ dequantize_packed(packed).t()
    # Beside the candidates: more splits than groups (some splits sum nothing), one warp; each with
    # sums per group and late.
    extra = [
        GemvConfig(n, k, warps, 1, split_k=split, late_sum=late)
        for n, k, warps, split in ((64, 128, 2, 16), (32, 64, 1, 2))
        for late in (False, True)
    ]
    extra = extra if one_row else []
    for plan in [*candidate_plans(one_row, 128), *extra]:
        out = (
            w4a16_gemv(x, packed, None, plan)
            if isinstance(plan, GemvConfig)
            else w4a16_matmul(x, packed, plan)
        )
        assert_relative(out, ref, TOLERANCE[HALF])


@pytest.mark.parametrize("magnitude", [1e-6, 1e4])
def test_w4a16_gemv_keeps_tiny_and_large_activations(magnitude: float) -> None:
    # Products are formed at 2^-64 times their value (the codes are read as subnormals): they must
    # stay normal floats for small activations and finite for large ones (fp32 activations: a 16-bit
    # output would round the small products itself).
    packed = random_packed(64, 512, 128, seed=4)
    x = torch.randn(1, 512, device=DEVICE) * magnitude
    out = w4a16_gemv(x, packed)
    assert_relative(out, x @ dequantize_packed(packed).t(), TOLERANCE[torch.float32])


def test_split_launches_leave_their_counters_at_zero_for_the_next() -> None:
    packed = random_packed(100, 2048, 64, seed=3)
    x = torch.randn(1, 2048, device=DEVICE).to(HALF)
    split = GemvConfig(16, 256, 4, 2, split_k=3)
    first = w4a16_gemv(x, packed, None, split)
    assert int(SCRATCH.buffers[x.device][1].abs().sum()) == 0
    torch.testing.assert_close(w4a16_gemv(x, packed, None, split), first, atol=0, rtol=0)
    assert_relative(first, x.float() @ dequantize_packed(packed).t(), TOLERANCE[HALF])


def test_w4a16_gemv_takes_one_row() -> None:
    packed = random_packed(32, 256, 32)
    with pytest.raises(ValueError, match="must be"):
        w4a16_gemv(torch.zeros(2, 256, device=DEVICE, dtype=HALF), packed)


def test_few_row_plans_fit_small_groups() -> None:
    for plan in candidate_plans(False, 32):
        assert isinstance(plan, W4A16Config) and 32 % plan.block_k == 0


# --- on a GPU: the kernels inside CUDA graphs ----------------------------------------------------


@ON_GPU
def test_decode_kernels_replay_in_a_cuda_graph() -> None:
    data, scale, _ = fp8_case(512, 1024)
    packed = random_packed(512, 1024, 128)
    x = torch.randn(16, 1024, device=DEVICE, dtype=torch.bfloat16)
    runs = [
        lambda: fp8_small_m(x[:1], data, scale),
        lambda: fp8_small_m(x[:9], data, scale),
        lambda: fp8_small_m(x[:1], data, scale, None, GemvConfig(8, 256, 4, 1, split_k=4)),
        lambda: w4a16_gemv(x[:1], packed, None, GemvConfig(32, 512, 4, 2)),
        lambda: w4a16_gemv(x[:1], packed, None, GemvConfig(16, 256, 4, 2, split_k=4)),
    ]
    for run in runs:
        run()  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [run() for run in runs]
    for _ in range(2):  # the split launch's counters must be back at zero for the second replay
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        for run, out in zip(runs, outs, strict=True):
            torch.testing.assert_close(out, run(), atol=0, rtol=0)


@ON_GPU
def test_a_chain_launched_with_pdl_in_a_cuda_graph_equals_it_launched_plainly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # RMSNorm and SiLU-and-mul signal the linears after them, which read their weights before waiting:
    # any read of an activation before its writer finished would change the bits.
    hidden, inter = 2048, 4096
    generator = torch.Generator().manual_seed(3)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * cols**-0.5).to(DEVICE, torch.bfloat16)

    norm = torch.ones(hidden, device=DEVICE, dtype=torch.bfloat16)
    gate_up, down = weight(2 * inter, hidden), weight(hidden, inter)
    fp8, fp8_scale, _ = fp8_case(2 * inter, hidden, seed=4)
    x = torch.randn(1, hidden, device=DEVICE, dtype=torch.bfloat16)
    configs = one_row_configs(2)

    def chain() -> torch.Tensor:
        h = x
        for layer in range(4):
            normed, _ = rms_norm(h, norm, 1e-5)
            if layer % 2:
                up = fp8_small_m(normed, fp8, fp8_scale)
            else:
                up = one_row_linear(normed, gate_up, None, None, configs[layer % len(configs)])
            config = configs[(layer + 1) % len(configs)]
            if layer < 2:
                h = one_row_linear(silu_and_mul(up), down, None, None, config)
            else:  # the activation made by the down projection as it loads its input
                h = one_row_linear(up, down, None, None, config, gated=True)
        return h

    monkeypatch.setenv(ENV_FLAG, "0")
    assert not pdl_enabled(x.device)
    plain = chain()
    monkeypatch.delenv(ENV_FLAG)
    chain()  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, plain, atol=0, rtol=0)
    x.copy_(torch.randn_like(x))
    monkeypatch.setenv(ENV_FLAG, "0")
    plain = chain()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
