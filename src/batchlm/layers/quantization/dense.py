"""Dense weights: a [rows, cols] parameter in the model's dtype (the path for safetensors checkpoints).

On the CPU in float32, post-load processing moves the weight to our C GEMM kernel's panel layout
(kernels/cpu_gemm.py). A linear then drops its dense copy; a layer that must keep it (an LM head,
whose weight a tied embedding still looks rows up in) keeps both, and where the kernel is missing
an LM head gets a oneDNN copy instead (layers/onednn.py).

On a GPU one row (a single sequence's decode step) may take our GEMV kernel instead of cuBLAS
(kernels/one_row_gemv.py, launched with PDL on Hopper): start-up times both per weight shape
(kernels/decode_plans.py) and keeps the faster; an untimed shape stays on cuBLAS.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from batchlm.kernels.cpu_gemm import can_pack, pack_weight, packed_linear
from batchlm.kernels.decode_plans import GemvConfig, PlanKey, PlanTable, bias_of, takes_decode_kernel
from batchlm.layers.onednn import onednn_linear, to_onednn_weight
from batchlm.layers.quantization.base import (
    LinearMethod,
    LoadedWeight,
    QuantizedColumns,
    QuantizedTensor,
    RowSlice,
)
from batchlm.layers.quantization.forms import Fp8Weight, Int8Weight

if TYPE_CHECKING:
    from batchlm.layers.quantization.layer import MethodLayer


class DenseLinearMethod(LinearMethod):
    """Dense tensors in, dense parameter stored; a quantized tensor is refused (see DequantizeLinearMethod)."""

    def create_weights(
        self, layer: MethodLayer, rows: int, cols: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        layer.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False)
        # The CPU kernel's packed copy and the LM head's oneDNN copy, made after loading.
        layer.packed = None
        layer.onednn_weight = None

    def load_rows(self, layer: MethodLayer, name: str, loaded: LoadedWeight, where: RowSlice) -> None:
        if not isinstance(loaded, torch.Tensor):
            kind = (
                loaded.qtype
                if isinstance(loaded, QuantizedTensor | QuantizedColumns)
                else type(loaded).__name__
            )
            raise ValueError(f"tensor {name!r} is {kind}-quantized; this layer takes dense weights")
        copy_rows(layer, loaded.narrow(0, where.src_start, where.rows), where)

    def process_after_loading(self, layer: MethodLayer) -> bool:
        if getattr(layer, "role", "linear") == "embedding":
            return False  # rows are looked up, never multiplied
        weight = layer.weight
        keep_dense = bool(getattr(layer, "keeps_dense_weight", False))
        if can_pack(weight):
            layer.packed = pack_weight(weight)
            if not keep_dense:
                # Released, not kept beside the packed copy: the model's memory does not double.
                layer.weight = nn.Parameter(weight.new_empty(0, weight.shape[1]), requires_grad=False)
            return True
        if keep_dense and getattr(layer, "onednn_fallback", False):
            layer.onednn_weight = to_onednn_weight(weight)
            return layer.onednn_weight is not None
        return False

    def apply(self, layer: MethodLayer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        packed = getattr(layer, "packed", None)
        if packed is not None:
            return packed_linear(x, packed, bias)
        onednn_weight = getattr(layer, "onednn_weight", None)
        if onednn_weight is not None and bias is None and x.dim() == 2 and x.shape[0] > 0:
            return onednn_linear(x.float(), onednn_weight)
        plan = one_row_plan(layer, x)
        if plan is not None:
            return one_row_dense(layer, x.reshape(1, -1).contiguous(), bias, plan).reshape(*x.shape[:-1], -1)
        return F.linear(x, layer.weight, bias)

    def apply_silu_gated(
        self, layer: MethodLayer, gate_up: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """One row on our GEMV: the activation is made as the kernel loads its input."""
        plan = one_row_plan(layer, gate_up)
        if plan is None:
            return None
        row = gate_up.reshape(1, -1).contiguous()
        return one_row_dense(layer, row, bias, plan, gated=True).reshape(*gate_up.shape[:-1], -1)

    def tune_decode(self, layers: Sequence[MethodLayer], dtype: torch.dtype) -> None:
        """Time one row of these layers' (common) shape: cuBLAS against our GEMV's launch shapes."""
        linears = [layer for layer in layers if getattr(layer, "role", "linear") != "embedding"]
        if not linears or linears[0].weight.dtype != dtype or linears[0].weight.numel() == 0:
            return
        x = torch.randn(1, linears[0].weight.shape[1], dtype=dtype, device=linears[0].weight.device)

        def launches(plan: GemvConfig | None) -> list[functools.partial[torch.Tensor]]:
            if plan is None:
                return [functools.partial(F.linear, x, layer.weight, bias_of(layer)) for layer in linears]
            return [functools.partial(one_row_dense, layer, x, bias_of(layer), plan) for layer in linears]

        DENSE_PLANS.tune(dense_plan_key(linears[0]), launches)

    def embed(self, layer: MethodLayer, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)


class DequantizeLinearMethod(DenseLinearMethod):
    """Quantized tensors dequantized into the dense parameter as they load (any GGML type the gguf
    package reads; a checkpoint's FP8 rows where the GPU has no FP8 tensor cores; GPTQ's 8-bit groups
    off the CPU kernels), then everything as DenseLinearMethod: the format for types without a kernel
    of ours on the device."""

    def load_rows(self, layer: MethodLayer, name: str, loaded: LoadedWeight, where: RowSlice) -> None:
        if isinstance(loaded, QuantizedTensor | QuantizedColumns | Fp8Weight | Int8Weight):
            rows = loaded.narrow_rows(where.src_start, where.rows).dequantize(layer.weight.dtype)
            copy_rows(layer, rows.to(layer.weight.device), where)
            return
        super().load_rows(layer, name, loaded, where)


def dense_candidates(key: PlanKey) -> list[GemvConfig | None]:
    """cuBLAS first (what an untimed shape gets), then our kernel's launch shapes for 16-bit weights."""
    from batchlm.kernels.one_row_gemv import one_row_configs

    return [None, *one_row_configs(weight_bytes=2)]


DENSE_PLANS: PlanTable[GemvConfig | None] = PlanTable(dense_candidates)


def dense_plan_key(layer: MethodLayer) -> PlanKey:
    rows, cols = layer.weight.shape
    return PlanKey("dense", rows, cols, one_row=True)


def one_row_plan(layer: MethodLayer, x: torch.Tensor) -> GemvConfig | None:
    """Our GEMV's launch shape for x when x is one row on a GPU and start-up timing chose our GEMV
    for this weight shape; None for cuBLAS."""
    if not (x.is_cuda and x.numel() == x.shape[-1] and x.dtype == layer.weight.dtype):
        return None
    return DENSE_PLANS.plan_for(dense_plan_key(layer)) if takes_decode_kernel(x.reshape(1, -1)) else None


def one_row_dense(
    layer: MethodLayer, row: torch.Tensor, bias: torch.Tensor | None, plan: GemvConfig, gated: bool = False
) -> torch.Tensor:
    from batchlm.kernels.one_row_gemv import one_row_linear

    return one_row_linear(row, layer.weight, None, bias, plan, gated=gated)


def copy_rows(layer: MethodLayer, part: torch.Tensor, where: RowSlice) -> None:
    with torch.no_grad():
        layer.weight.narrow(0, where.dst_start, where.rows).copy_(part)


DENSE = DenseLinearMethod()
DEQUANTIZE = DequantizeLinearMethod()
