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


class ClampedSwiGLU(nn.Module):
    """gpt-oss's experts: g * sigmoid(alpha * g) * (u + 1), with the gate g capped at `limit` from above
    and the up projection u clamped to [-limit, limit], on [gate | up]. Its HF config says
    hidden_act "silu" and states alpha and limit apart (swiglu_alpha, swiglu_limit), so the expert
    block asks for this one by the name ACTIVATIONS gives it."""

    def __init__(self, alpha: float = 1.702, limit: float = 7.0) -> None:
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, 2 * intermediate] -> [T, intermediate]; transformers' order of operations.
        half = x.shape[-1] // 2
        gate = x[..., :half].clamp(max=self.limit)
        up = x[..., half:].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


# The activations an HF config's hidden_act may name.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul,
    "gelu_tanh": GeluTanhAndMul,
}
# Those no config names, which a family asks for by our name (gpt-oss's experts).
CLAMPED_SWIGLU = "swiglu_clamped"
GATED_ACTIVATIONS: dict[str, type[nn.Module]] = {**ACTIVATIONS, CLAMPED_SWIGLU: ClampedSwiGLU}


def get_gated_activation(name: str, **options: float) -> nn.Module:
    """The gated activation called `name` in an HF config (`hidden_act`), built with `options` (the
    clamped SwiGLU's alpha and limit)."""
    if name not in GATED_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return GATED_ACTIVATIONS[name](**options)
