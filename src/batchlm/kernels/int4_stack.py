"""The 4-bit weight stacks the grouped GEMM reads (kernels/moe_gemm.py), apart from the kernel so that
layers can hold them on machines without Triton."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Codes a byte holds.
INT4_CODES_PER_BYTE = 2


@dataclass(frozen=True)
class Int4Stack:
    """Stacked 4-bit weights with a scale and a zero point per group of inputs, [E, N, K] as values:
    w[e, n, k] = (code - zeros[e, n, k // g]) * scales[e, n, k // g]. `codes` uint8 [E, N, K / 2]
    (input 2j of a row in the low nibble of byte j, 2j + 1 in the high one), `scales` [E, N, K / g]
    in a float dtype, `zeros` uint8 [E, N, K / g] (GPTQ's stored zero plus one may reach 16)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __post_init__(self) -> None:
        experts, rows, half = self.codes.shape
        if self.codes.dtype != torch.uint8 or self.zeros.dtype != torch.uint8:
            raise ValueError("4-bit codes and zero points are uint8")
        if not self.scales.dtype.is_floating_point:
            raise ValueError(f"4-bit scales are floats, not {self.scales.dtype}")
        groups = self.scales.shape[-1]
        if self.scales.shape != (experts, rows, groups) or self.zeros.shape != self.scales.shape:
            raise ValueError(
                f"4-bit scales {tuple(self.scales.shape)} and zero points {tuple(self.zeros.shape)} do not "
                f"fit codes {tuple(self.codes.shape)}"
            )
        if groups == 0 or (half * INT4_CODES_PER_BYTE) % groups:
            raise ValueError(f"{half * INT4_CODES_PER_BYTE} inputs do not split into {groups} whole groups")
        if any(t.stride(-1) != 1 for t in (self.codes, self.scales, self.zeros)):
            raise ValueError("4-bit stacks are contiguous along their last dimension")

    @property
    def shape(self) -> tuple[int, int, int]:
        experts, rows, half = self.codes.shape
        return experts, rows, half * INT4_CODES_PER_BYTE

    @property
    def group_size(self) -> int:
        return self.shape[2] // self.scales.shape[-1]
