"""The FP8 weight stacks the grouped GEMM reads (kernels/moe_gemm.py), apart from the kernel so that
layers can hold them on machines without Triton."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchlm.kernels.fp8_types import FP8_DTYPE


@dataclass(frozen=True)
class Fp8Stack:
    """Stacked FP8 weights, [E, N, K] as values: `values` float8_e4m3fn [E, N, K] and `scales` float32
    [E, N], one per output row of each expert: w = values * scales[..., None]."""

    values: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        if self.values.dtype != FP8_DTYPE or self.scales.dtype != torch.float32:
            raise ValueError(
                f"FP8 stacks hold float8_e4m3fn values and float32 scales, not {self.values.dtype} and "
                f"{self.scales.dtype}"
            )
        if self.values.dim() != 3 or self.scales.shape != self.values.shape[:2]:
            raise ValueError(
                f"FP8 scales {tuple(self.scales.shape)} do not fit values {tuple(self.values.shape)}: "
                "one scale per expert row"
            )
        if self.values.stride(-1) != 1 or self.scales.stride(-1) != 1:
            raise ValueError("FP8 stacks are contiguous along their last dimension")

    @property
    def shape(self) -> tuple[int, int, int]:
        experts, rows, cols = self.values.shape
        return experts, rows, cols
