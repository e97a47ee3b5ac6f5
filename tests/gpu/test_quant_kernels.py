"""The W4A16 Triton GEMM and the per-token FP8 activation quantizer against plain-torch references,
and the FP8 scaled matmul (cuBLASLt) against the same product emulated in float32.

GPU only (marked `gpu`); TRITON_INTERPRET=1 runs the W4A16 and quantizer cases on the CPU (fp16 and
fp32: the interpreter's bf16 dot is broken, and its float32 -> e4m3 conversion rounds down to the
power of two below, so the quantizer's codes are checked exactly only on a GPU).

Tolerances (max abs error over the largest |reference|): W4A16 takes the same dequantized weights
as the reference, so only the dot's rounding differs: fp32 1e-5, fp16 2e-3, bf16 1e-2. The FP8 GEMM
against its float32 emulation: the bf16 output's rounding, 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from devices import HALF, INTERPRET, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from int4_cases import DEVICE, assert_relative, random_packed  # noqa: E402

from batchlm.kernels.fp8_linear import fp8_linear  # noqa: E402
from batchlm.kernels.fp8_quant import per_token_fp8  # noqa: E402
from batchlm.kernels.fp8_types import FP8_DTYPE  # noqa: E402
from batchlm.kernels.int4_pack import dequantize_packed, unpack_codes  # noqa: E402
from batchlm.kernels.w4a16_gemm import W4A16Config, choose_config, w4a16_matmul  # noqa: E402
from batchlm.layers.quantization.forms import quantize_fp8_rows  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def test_packing_round_trips() -> None:
    packed, codes = random_packed(48, 256, 64, torch.float32)
    assert torch.equal(unpack_codes(packed).cpu(), codes)


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 100])
@pytest.mark.parametrize(
    ("out_features", "in_features", "group"), [(96, 256, 32), (200, 512, 128), (64, 384, 128)]
)
def test_w4a16_matches_the_dequantized_weight(
    dtype: torch.dtype, rows: int, out_features: int, in_features: int, group: int
) -> None:
    packed, _ = random_packed(out_features, in_features, group, dtype)
    x = torch.randn(rows, in_features, device=DEVICE).to(dtype)
    ref = x.float() @ dequantize_packed(packed).t()
    assert_relative(w4a16_matmul(x, packed), ref, TOLERANCE[dtype])


@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
def test_w4a16_split_counts_agree(split_k: int) -> None:
    # 3 does not divide the 8 K tiles: the last split's tail is masked off.
    packed, _ = random_packed(64, 512, 64, HALF)
    x = torch.randn(4, 512, device=DEVICE).to(HALF)
    ref = x.float() @ dequantize_packed(packed).t()
    config = W4A16Config(16, 64, 64, split_k, num_warps=4, num_stages=2)
    assert_relative(w4a16_matmul(x, packed, config), ref, TOLERANCE[HALF])


def test_decode_shapes_split_k_and_prefill_shapes_do_not() -> None:
    packed, _ = random_packed(4096, 4096, 128, HALF)
    assert choose_config(1, packed, 132).split_k > 1
    assert choose_config(512, packed, 132).split_k == 1


def test_w4a16_rejects_a_wrong_width() -> None:
    packed, _ = random_packed(64, 256, 64, HALF)
    with pytest.raises(ValueError, match="must be"):
        w4a16_matmul(torch.zeros(2, 128, device=DEVICE, dtype=HALF), packed)


@pytest.mark.parametrize("static", [False, True])
def test_per_token_fp8_scales_and_codes(static: bool) -> None:
    torch.manual_seed(3)
    x = (torch.randn(7, 1000, device=DEVICE) * torch.logspace(-2, 2, 7, device=DEVICE)[:, None]).to(HALF)
    static_scale = torch.tensor([0.05], device=DEVICE) if static else None
    codes, scales = per_token_fp8(x, static_scale)
    expected_scales = (
        static_scale.expand(7)[:, None]
        if static_scale is not None
        else x.float().abs().amax(dim=1, keepdim=True) / 448.0
    )
    torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0.0)
    expected = (x.float() / expected_scales).clamp(-448, 448).to(FP8_DTYPE).float()
    got = codes.float()
    assert not got.isnan().any() and float(got.abs().max()) <= 448.0
    if INTERPRET:
        assert bool(((got - expected).abs() <= expected.abs() / 2 + 2**-9).all())
    else:
        # x * (1 / s) in the kernel against x / s here: a code may land one e4m3 step apart.
        step = expected.abs().clamp(min=2**-6) / 8
        assert bool(((got - expected).abs() <= step).all())
        assert float((got != expected).float().mean()) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's FP8 GEMM needs a GPU")
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_gemm_matches_its_float32_emulation(rows: int, static: bool) -> None:
    torch.manual_seed(4)
    weight = quantize_fp8_rows(torch.randn(384, 512, device=DEVICE) * 0.05)
    x = torch.randn(rows, 512, device=DEVICE).bfloat16()
    input_scale = torch.tensor([0.02], device=DEVICE) if static else None
    out = fp8_linear(x, weight.data, weight.scale[None, :], input_scale, None)
    codes, scales = per_token_fp8(x, input_scale)
    ref = (codes.float() @ weight.data.float().t()) * scales * weight.scale[None, :]
    assert out.dtype == torch.bfloat16
    assert_relative(out, ref, 1e-2)
