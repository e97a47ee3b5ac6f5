"""Gated activations of Llama- and Gemma-style MLPs, on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchlm.kernels.dispatch import fused_ops_for


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is the concatenation [gate | up] along the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, 2 * intermediate] -> [T, intermediate]
        fused = fused_ops_for(x) if x.dim() == 2 else None
        if fused is not None:
            return fused.silu_and_mul(x)
        half = x.shape[-1] // 2
        return F.silu(x[..., :half]) * x[..., half:]


class GeluTanhAndMul(nn.Module):
    """gelu(gate, tanh approximation) * up (Gemma's `gelu_pytorch_tanh`), on [gate | up]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, 2 * intermediate] -> [T, intermediate]
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
