"""A quantized model's RMS norms and gated activations outside the fused decode stack (prompts, bigger
batches), with the stack's own arithmetic (cpu_row_ops.c, built into its library): each is one C call
over its rows, where torch's path takes several passes and wakes the threads for each. The fused
stack already computes these for the model's decode steps, so a model's norms and gates are then one
code whichever path a step takes. Dense float32 models keep torch's ops, whose bits match
transformers'."""

from __future__ import annotations

import ctypes

import torch

from batchlm.kernels.cpu_native import pointer_of, threads_for_rows

# The kernel's norm walks rows in vectors of this many floats.
VECTOR = 8


class StackRowOps:
    """The row operations of one loaded stack library; each returns None where it does not take the
    given tensors (the caller then uses torch's ops)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library

    def rms_norm(
        self, x: torch.Tensor, factor: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """rmsnorm(x (+ residual)) * factor over the last dimension, and with a residual the sum (the
        new residual stream). x is [T, n] or a token's heads [T, H, n] (heads contiguous within a
        token); a residual only with [T, n]."""
        n = x.shape[-1]
        if not _floats(x, factor) or x.dim() not in (2, 3) or n % VECTOR or factor.shape != (n,):
            return None
        if x.stride(-1) != 1 or (x.dim() == 3 and x.stride(1) != n) or not factor.is_contiguous():
            return None
        if residual is not None and (
            x.dim() != 2 or residual.shape != x.shape or not _floats(residual) or not residual.is_contiguous()
        ):
            return None
        tokens, inner = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
        out = torch.empty(x.shape, dtype=torch.float32)
        total = None if residual is None else torch.empty(x.shape, dtype=torch.float32)
        self._library.batchlm_rows_rms_norm(
            x.data_ptr(), x.stride(0), pointer_of(residual), pointer_of(total), factor.data_ptr(), eps,
            out.data_ptr(), tokens, inner, n, threads_for_rows(tokens * inner),
        )  # fmt: skip
        return out, total

    def gate_mul(self, x: torch.Tensor, gelu: bool) -> torch.Tensor | None:
        """gate(x[:, :I]) * x[:, I:] for the fused [gate | up] rows x [T, 2I]: SiLU, or GELU (tanh)."""
        if not _floats(x) or x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
            return None
        rows, inner = x.shape[0], x.shape[1] // 2
        out = torch.empty(rows, inner, dtype=torch.float32)
        self._library.batchlm_rows_gate_mul(
            x.data_ptr(), x.stride(0), out.data_ptr(), rows, inner, int(gelu), threads_for_rows(rows)
        )
        return out


def _floats(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
