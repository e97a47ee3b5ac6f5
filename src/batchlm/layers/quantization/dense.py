"""Dense weights: a [rows, cols] parameter in the model's dtype (the path for safetensors checkpoints).

On the CPU in float32, post-load processing moves the weight to our C GEMM kernel's panel layout
(kernels/cpu_gemm.py). A linear then drops its dense copy; a layer that must keep it (an LM head,
whose weight a tied embedding still looks rows up in) keeps both, and where the kernel is missing
an LM head gets a oneDNN copy instead (layers/onednn.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from batchlm.kernels.cpu_gemm import can_pack, pack_weight, packed_linear
from batchlm.layers.onednn import onednn_linear, to_onednn_weight
from batchlm.layers.quantization.base import LinearMethod, LoadedWeight, QuantizedTensor, RowSlice

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
            kind = loaded.qtype if isinstance(loaded, QuantizedTensor) else type(loaded).__name__
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
        return F.linear(x, layer.weight, bias)

    def embed(self, layer: MethodLayer, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)


class DequantizeLinearMethod(DenseLinearMethod):
    """Quantized tensors dequantized into the dense parameter as they load (any GGML type the gguf
    package reads), then everything as DenseLinearMethod: the format for types without our own kernel."""

    def load_rows(self, layer: MethodLayer, name: str, loaded: LoadedWeight, where: RowSlice) -> None:
        if isinstance(loaded, QuantizedTensor):
            rows = loaded.narrow_rows(where.src_start, where.rows).dequantize(layer.weight.dtype)
            copy_rows(layer, rows, where)
            return
        super().load_rows(layer, name, loaded, where)


def copy_rows(layer: MethodLayer, part: torch.Tensor, where: RowSlice) -> None:
    with torch.no_grad():
        layer.weight.narrow(0, where.dst_start, where.rows).copy_(part)


DENSE = DenseLinearMethod()
DEQUANTIZE = DequantizeLinearMethod()
