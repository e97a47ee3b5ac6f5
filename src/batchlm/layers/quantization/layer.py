"""The part of a linear, embedding or LM head layer that hands its weight to a LinearMethod."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from batchlm.kernels.cpu_gemm import PackedWeight
from batchlm.layers.quantization.base import LinearMethod
from batchlm.layers.quantization.dense import DENSE


class MethodLayer(nn.Module):
    """A layer whose weight storage, loading and matmul belong to its `method` (dense by default).

    The weight is created in the dtype and on the device in effect when the layer is built; the
    loader may swap the method (`set_method`) before any tensor is loaded, which re-creates it.
    """

    # The role a method chooser is told about (see quantization/registry.py).
    role: ClassVar[str] = "linear"
    method: LinearMethod
    # The dense weight (its methods may keep other forms beside it, or leave it empty).
    weight: torch.Tensor
    # Copies of the weight made after loading, for the CPU (see quantization/dense.py); not parameters,
    # so checkpoints and state dicts never see them.
    packed: PackedWeight | None = None
    onednn_weight: torch.Tensor | None = None

    def init_weight(self, rows: int, cols: int) -> None:
        self.weight_rows, self.weight_cols = rows, cols
        self.params_dtype = torch.get_default_dtype()
        self.params_device = torch.get_default_device()
        self.set_method(DENSE)

    def set_method(self, method: LinearMethod) -> None:
        self.method = method
        method.create_weights(self, self.weight_rows, self.weight_cols, self.params_dtype, self.params_device)

    def process_weights_after_loading(self) -> bool:
        """Called once the weights are final; True when the method changed their form."""
        return self.method.process_after_loading(self)


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether any layer of `model` holds its weight other than as a dense checkpoint's: quantized, or
    from a GGUF file (dequantized as it loaded, whatever its type)."""
    return any(isinstance(module, MethodLayer) and module.method is not DENSE for module in model.modules())
