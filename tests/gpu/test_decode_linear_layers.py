"""The linear layers' decode dispatch on a GPU: start-up timing of each weight shape's launches
(cuBLAS or our one-row GEMV for bf16, the FP8 and W4A16 decode plans) and the choice applied at every
row count, against float32 products with the dequantized weight; and the gated MLP's down projection
that makes SiLU-and-mul itself on the one-row GEMV. The kernels themselves: test_decode_linears.py.
"""

from __future__ import annotations

import pytest
import torch
from devices import require_cuda

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")
require_cuda()

from int4_cases import DEVICE, assert_relative  # noqa: E402

from batchlm.kernels.decode_plans import PlanKey  # noqa: E402
from batchlm.kernels.fp8_gemv import candidate_configs  # noqa: E402
from batchlm.kernels.fused_ops import silu_and_mul  # noqa: E402
from batchlm.kernels.one_row_gemv import one_row_configs  # noqa: E402
from batchlm.layers.linear import RowParallelLinear  # noqa: E402
from batchlm.layers.quantization.base import LinearMethod  # noqa: E402
from batchlm.layers.quantization.decode_tuning import tune_decode_linears  # noqa: E402
from batchlm.layers.quantization.dense import DENSE, DENSE_PLANS, dense_plan_key  # noqa: E402
from batchlm.layers.quantization.fp8 import FP8, FP8_PLANS  # noqa: E402
from batchlm.layers.quantization.int4 import INT4  # noqa: E402


def quantized_layer(method: LinearMethod, out_features: int, in_features: int) -> RowParallelLinear:
    """A bf16 layer with a bias (built as a model builds its layers) whose weight `method` quantizes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            layer = RowParallelLinear(in_features, out_features, bias=True)
    finally:
        torch.set_default_dtype(previous)
    layer.set_method(method)
    layer.load_weight("w", "weight", torch.randn(out_features, in_features, device=DEVICE) * 0.05)
    layer.load_weight("b", "bias", torch.randn(out_features, device=DEVICE))
    layer.process_weights_after_loading()
    return layer


@pytest.mark.parametrize("method", [FP8, INT4], ids=["fp8", "w4a16"])
def test_tuned_layers_match_their_dequantized_weight_at_every_row_count(method: LinearMethod) -> None:
    layers = torch.nn.ModuleList([quantized_layer(method, 384, 512) for _ in range(3)])
    assert tune_decode_linears(layers, torch.bfloat16) == 1
    for layer in layers:
        dense = layer.method.dequantized(layer)
        for rows in (1, 3, 16, 40):
            x = torch.randn(rows, 512, device=DEVICE, dtype=torch.bfloat16)
            # FP8 above 16 rows quantizes the activations too (1/16 of each value at most).
            tolerance = 1e-2 if rows <= 16 or method is INT4 else 6e-2
            assert_relative(layer(x), x.float() @ dense.t() + layer.bias.float(), tolerance)


def test_a_tuned_plan_is_the_one_applied() -> None:
    layer = quantized_layer(FP8, 256, 512)
    key = PlanKey("fp8", 256, 512, True)
    FP8_PLANS.chosen[key] = None  # the scaled-matmul plan: the activations are quantized
    x = torch.randn(1, 512, device=DEVICE, dtype=torch.bfloat16)
    quantized = layer(x)
    FP8_PLANS.chosen[key] = candidate_configs(True)[0]
    unquantized = layer(x)
    del FP8_PLANS.chosen[key]
    ref = x.float() @ layer.method.dequantized(layer).t() + layer.bias.float()
    assert_relative(unquantized, ref, 1e-2)
    assert not torch.equal(quantized, unquantized)


def test_dense_layers_time_cublas_against_the_one_row_kernel_and_apply_the_choice() -> None:
    layers = torch.nn.ModuleList([quantized_layer(DENSE, 384, 512) for _ in range(3)])
    assert tune_decode_linears(layers, torch.bfloat16) == 1
    key = dense_plan_key(layers[0])
    assert key in DENSE_PLANS.chosen
    try:
        for plan in (None, one_row_configs(2)[0]):
            DENSE_PLANS.chosen[key] = plan
            for layer in layers:
                for rows in (1, 3):
                    x = torch.randn(rows, 512, device=DEVICE, dtype=torch.bfloat16)
                    ref = x.float() @ layer.weight.float().t() + layer.bias.float()
                    assert_relative(layer(x), ref, 1e-2)
    finally:
        del DENSE_PLANS.chosen[key]


@pytest.mark.parametrize("method", [DENSE, FP8, INT4], ids=["bf16", "fp8", "w4a16"])
def test_a_down_projection_makes_the_silu_itself_only_on_the_one_row_gemv(method: LinearMethod) -> None:
    layer = quantized_layer(method, 384, 512)
    tune_decode_linears(torch.nn.ModuleList([layer]), torch.bfloat16)
    gate_up = torch.randn(1, 1024, device=DEVICE, dtype=torch.bfloat16)
    fused = layer.forward_silu_gated(gate_up)
    if method is INT4:
        # Its kernel has no instructions to spare for the activation (BENCHMARKS.md): no fused path.
        assert fused is None
        return
    plans, key = (
        (DENSE_PLANS, dense_plan_key(layer))
        if method is DENSE
        else (FP8_PLANS, PlanKey("fp8", 384, 512, True))
    )
    try:
        if plans.chosen.get(key) is None:
            plans.chosen[key] = one_row_configs(1 if method is FP8 else 2)[0]
            fused = layer.forward_silu_gated(gate_up)
        assert fused is not None
        torch.testing.assert_close(fused, layer(silu_and_mul(gate_up)), atol=0, rtol=0)
        # Several rows, or cuBLAS chosen for this shape: the caller applies the activation itself.
        assert layer.forward_silu_gated(gate_up.expand(3, -1).contiguous()) is None
        plans.chosen[key] = None
        assert layer.forward_silu_gated(gate_up) is None
    finally:
        del plans.chosen[key]
