"""Gated activations of Llama- and Gemma-style MLPs, on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchlm.kernels.cpu_row_ops import StackRowOps
from batchlm.kernels.dispatch import fused_ops_for


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is the concatenation [gate | up] along the last dim."""

    # A quantized model on a CPU: the fused decode stack's row operations (kernels/cpu_row_ops.py).
    row_ops: StackRowOps | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, 2 * intermediate] -> [T, intermediate]
        gated = None if self.row_ops is None else self.row_ops.gate_mul(x, gelu=False)
        if gated is not None:
            return gated
        fused = fused_ops_for(x) if x.dim() == 2 else None
        if fused is not None:
            out: torch.Tensor = fused.silu_and_mul(x)
            return out
        half = x.shape[-1] // 2
        return F.silu(x[..., :half]) * x[..., half:]


class GeluTanhAndMul(nn.Module):
    """gelu(gate, tanh approximation) * up (Gemma's `gelu_pytorch_tanh`), on [gate | up]."""

    row_ops: StackRowOps | None = None  # as SiluAndMul's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, 2 * intermediate] -> [T, intermediate]
        gated = None if self.row_ops is None else self.row_ops.gate_mul(x, gelu=True)
        if gated is not None:
            return gated
        half = x.shape[-1] // 2
        return F.gelu(x[..., :half], approximate="tanh") * x[..., half:]


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul,
    "gelu_tanh": GeluTanhAndMul,
}


def get_gated_activation(name: str) -> nn.Module:
    """The gated activation called `name` in an HF config (`hidden_act`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
