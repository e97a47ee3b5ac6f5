"""FP8 W8A8: e4m3 weights with one scale per output channel, activations quantized per token at run
time (or with the checkpoint's static scale), multiplied by kernels/fp8_linear.py.

Weights arrive as an Fp8Weight (an FP8 checkpoint: compressed-tensors FP8_DYNAMIC or static FP8,
a per-tensor scale expanded to every row) or dense (--quantization fp8: each row quantized as it
loads). Fused q/k/v and gate/up shards keep their own row scales; shards with different static
activation scales share the largest one.

At decode sizes (1..16 rows of 16-bit activations on a GPU) a Triton kernel reads the activations
unquantized (kernels/fp8_gemv.py) with a launch shape timed per weight shape at start-up
(kernels/decode_plans.py); that timing may also pick the scaled matmul, the plan `None`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from batchlm.kernels.decode_plans import (
    GemvConfig,
    PlanKey,
    PlanTable,
    bias_of,
    bucket_rows,
    takes_decode_kernel,
)
from batchlm.kernels.fp8_linear import fp8_linear
from batchlm.kernels.fp8_types import FP8_DTYPE
from batchlm.layers.quantization.base import (
    LinearMethod,
    LoadedWeight,
    QuantizedColumns,
    QuantizedTensor,
    RowSlice,
)
from batchlm.layers.quantization.forms import (
    Fp8Weight,
    GroupedCodes,
    check_fp8_device,
    quantize_fp8_rows,
)

if TYPE_CHECKING:
    from batchlm.layers.quantization.layer import MethodLayer


class Fp8LinearMethod(LinearMethod):
    """`weight` is the FP8 [rows, cols] parameter; `fp8_scale` its [1, rows] float32 row scales and
    `fp8_input_scale` the static activation scale ([1] float32) or None for per-token scales."""

    def create_weights(
        self, layer: MethodLayer, rows: int, cols: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        check_fp8_device(device, "FP8 W8A8 weights")
        layer.weight = nn.Parameter(
            torch.empty(rows, cols, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        setattr(layer, "fp8_scale", torch.ones(1, rows, dtype=torch.float32, device=device))  # noqa: B010
        setattr(layer, "fp8_input_scale", None)  # noqa: B010
        layer.packed = None
        layer.onednn_weight = None

    def load_rows(self, layer: MethodLayer, name: str, loaded: LoadedWeight, where: RowSlice) -> None:
        if isinstance(loaded, (QuantizedTensor, QuantizedColumns, GroupedCodes)):
            raise ValueError(f"tensor {name!r} is not an FP8 or dense weight; the fp8 method cannot load it")
        part = loaded.narrow_rows(where.src_start, where.rows) if isinstance(loaded, Fp8Weight) else loaded
        device = layer.weight.device
        if isinstance(part, torch.Tensor):
            # Quantized where the layer lives (a GPU does an 8B model's rows in moments).
            part = quantize_fp8_rows(part.narrow(0, where.src_start, where.rows).to(device))
        with torch.no_grad():
            layer.weight.narrow(0, where.dst_start, where.rows).copy_(part.data.to(device))
            scale_of(layer).narrow(1, where.dst_start, where.rows).copy_(part.scale.to(device)[None, :])
        if part.input_scale is not None:
            previous = input_scale_of(layer)
            value = part.input_scale if previous is None else max(part.input_scale, float(previous.item()))
            setattr(layer, "fp8_input_scale", torch.tensor([value], dtype=torch.float32, device=device))  # noqa: B010

    def apply(self, layer: MethodLayer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        plan = decode_plan(layer, rows)
        if plan is not None:
            out = decode_linear(layer, rows.contiguous(), bias, plan)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return fp8_linear(x, layer.weight, scale_of(layer), input_scale_of(layer), bias)

    def apply_silu_gated(
        self, layer: MethodLayer, gate_up: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """One row on the one-row GEMV: the activation is made as the kernel loads its input."""
        row = gate_up.reshape(-1, gate_up.shape[-1])
        plan = decode_plan(layer, row) if row.shape[0] == 1 else None
        if plan is None:
            return None
        out = decode_linear(layer, row.contiguous(), bias, plan, gated=True)
        return out.reshape(*gate_up.shape[:-1], out.shape[-1])

    def tune_decode(self, layers: Sequence[MethodLayer], dtype: torch.dtype) -> None:
        """Time the decode plans for these layers' (common) shape, one row and 2..16 rows."""
        device = layers[0].weight.device
        for one_row in (True, False):
            x = torch.randn(bucket_rows(one_row), layers[0].weight.shape[1], dtype=dtype, device=device)

            def launches(
                plan: GemvConfig | None, x: torch.Tensor = x
            ) -> list[functools.partial[torch.Tensor]]:
                if plan is None:
                    return [functools.partial(self._scaled_mm, layer, x) for layer in layers]
                return [functools.partial(decode_linear, layer, x, bias_of(layer), plan) for layer in layers]

            FP8_PLANS.tune(plan_key(layers[0], one_row), launches)

    def _scaled_mm(self, layer: MethodLayer, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, layer.weight, scale_of(layer), input_scale_of(layer), None)

    def embed(self, layer: MethodLayer, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("FP8 weights serve linear layers only; embeddings stay dense")

    def dequantized(self, layer: MethodLayer) -> torch.Tensor:
        """The float32 [rows, cols] weight the codes stand for (tests, references)."""
        return layer.weight.float() * scale_of(layer).t()


def fp8_candidates(key: PlanKey) -> list[GemvConfig | None]:
    from batchlm.kernels.fp8_gemv import candidate_configs

    return [*candidate_configs(key.one_row), None]


FP8_PLANS: PlanTable[GemvConfig | None] = PlanTable(fp8_candidates)


def plan_key(layer: MethodLayer, one_row: bool) -> PlanKey:
    rows, cols = layer.weight.shape
    return PlanKey("fp8", rows, cols, one_row)


def decode_plan(layer: MethodLayer, rows: torch.Tensor) -> GemvConfig | None:
    """The decode kernel's launch shape for these rows where start-up timing chose it for this
    weight shape; None for the scaled-matmul path."""
    if not takes_decode_kernel(rows):
        return None
    return FP8_PLANS.plan_for(plan_key(layer, rows.shape[0] == 1))


def decode_linear(
    layer: MethodLayer, rows: torch.Tensor, bias: torch.Tensor | None, plan: GemvConfig, gated: bool = False
) -> torch.Tensor:
    from batchlm.kernels.fp8_gemv import fp8_small_m

    return fp8_small_m(rows, layer.weight, scale_of(layer), bias, plan, gated=gated)


def scale_of(layer: MethodLayer) -> torch.Tensor:
    scale = layer.__dict__.get("fp8_scale")
    assert isinstance(scale, torch.Tensor), "the layer's weights were not created by the fp8 method"
    return scale


def input_scale_of(layer: MethodLayer) -> torch.Tensor | None:
    scale = layer.__dict__.get("fp8_input_scale")
    return scale if isinstance(scale, torch.Tensor) else None


FP8 = Fp8LinearMethod()
