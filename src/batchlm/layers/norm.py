"""RMSNorm, with a variant that adds the residual stream first (one call per sub-block)."""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from batchlm.kernels.cpu_row_ops import StackRowOps
from batchlm.kernels.dispatch import fused_ops_for


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in float32 like the HF reference.

    `norm(x)` returns the normed tensor; `norm(x, residual)` first forms x + residual and returns
    (normed, new_residual), which lets decoder layers carry the residual stream without extra adds.
    """

    # A quantized model on a CPU: the fused decode stack's row operations (kernels/cpu_row_ops.py).
    row_ops: StackRowOps | None = None

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden]
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused kernel instead of five passes; bit-identical to the form below in float32.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Statistics in float32 so bf16/fp16 inputs do not lose precision; the weight multiplies
        # after the cast back, as in HF (which F.rms_norm does not do for half types).
        x32 = x.float()
        variance = x32.pow(2).mean(dim=-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.eps)
        return self.weight * x32.to(x.dtype)

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.row_ops is not None:
            done = self.row_ops.rms_norm(x, self.weight, self.eps, residual)
            if done is not None:
                normed, total = done
                return normed if total is None else (normed, total)
        fused = fused_ops_for(x) if x.dim() == 2 else None
        if fused is not None:
            # GPU: residual add and norm in one kernel.
            normed, new_residual = fused.rms_norm(x, self.weight, self.eps, residual)
            return normed if new_residual is None else (normed, new_residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Float32WeightRMSNorm(RMSNorm):
    """RMSNorm whose weight multiplies the normed values in float32, before the cast back to the input's
    dtype (gpt-oss's reference; RMSNorm casts first, as Llama's does). The two agree in float32; in
    bf16 the product is rounded once here, twice there. The fused kernels (GPU, the CPU decode stack)
    cast first, so this norm keeps to torch ops."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super()._norm(x)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
