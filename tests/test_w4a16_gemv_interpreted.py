"""The one-row W4A16 GEMV with bf16 activations, as the GPU engine feeds it, run on the CPU through
Triton's interpreter (tests/gpu/test_decode_linears.py runs it there in fp16 and float32 only): its
products are formed at 2^-64 times their value from codes read as subnormal floats
(kernels/w4a16_gemv.py), so zeros, negative zeros, subnormal, tiny and large activations must all
come out as the float32 product with the dequantized weight, rounded to bf16."""

from __future__ import annotations

from interpreter_harness import run_interpreted

INTERPRET_CHECK = """
import torch

from batchlm.kernels.decode_plans import GemvConfig
from batchlm.kernels.int4_pack import dequantize_packed, pack_int4
from batchlm.kernels.w4a16_gemv import w4a16_gemv

generator = torch.Generator().manual_seed(0)
out_features, in_features, group = 72, 384, 64
codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
scales = (torch.rand(out_features, in_features // group, generator=generator) * 0.02 + 0.005).to(torch.bfloat16)
zeros = torch.randint(0, 16, (out_features, in_features // group), generator=generator).to(torch.bfloat16)
packed = pack_int4(codes, scales, zeros, group)
weight = dequantize_packed(packed)
x = torch.randn(1, in_features, generator=generator)
x[0, :8] = 0.0  # a whole word row of zeros
x[0, 8:16] = -0.0
x[0, 16:24] = 1e-39  # subnormal in bf16
x[0, 24:32] = torch.tensor([3e4, -3e4, 1e8, -1e8, 2.0**-120, -(2.0**-120), 7.5, -0.125])
x = x.to(torch.bfloat16)
reference = x.float() @ weight.t()
# Splits that cover the groups exactly (no masked activation reads) and one with a tail past them;
# sums per group and late.
for config in (
    GemvConfig(32, 64, 1, 1, split_k=2),
    GemvConfig(32, 64, 1, 1, split_k=2, late_sum=True),
    GemvConfig(64, 128, 2, 1, split_k=4),
    GemvConfig(64, 128, 2, 1, split_k=4, late_sum=True),
):
    out = w4a16_gemv(x, packed, None, config)
    assert out.dtype == torch.bfloat16
    error = ((out.float() - reference).norm() / reference.norm()).item()
    assert error < 8e-3, (config, error)  # the bf16 output's rounding
    # Nothing but that rounding: each output is the reference rounded to bf16, give or take an ulp.
    assert torch.allclose(out.float(), reference, rtol=2 ** -7, atol=1e-2), config
print("w4a16 gemv ok")
"""


def test_w4a16_gemv_on_bf16_activations_under_the_triton_interpreter() -> None:
    run_interpreted(INTERPRET_CHECK, "w4a16 gemv ok")
