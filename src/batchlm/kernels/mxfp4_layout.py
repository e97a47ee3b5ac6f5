"""The MXFP4 weight stacks the grouped GEMM reads (kernels/moe_gemm.py), apart from the kernel so
that layers can hold them on machines without Triton."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Inputs a scale byte of MXFP4 covers, and codes a byte holds.
MXFP4_GROUP = 32
MXFP4_CODES_PER_BYTE = 2


@dataclass(frozen=True)
class Mxfp4Stack:
    """Stacked MXFP4 weights, [E, N, K] as values: `codes` uint8 [E, N, K / 2] (input 2j of a row in
    the low nibble of byte j, 2j + 1 in the high one: e2m1 codes, bit 3 the sign) and `scales` uint8
    [E, N, K / 32] (the exponent byte e of each 32 inputs' scale 2^(e - 127))."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        experts, rows, half = self.codes.shape
        if self.codes.dtype != torch.uint8 or self.scales.dtype != torch.uint8:
            raise ValueError("MXFP4 codes and scales are uint8")
        if self.scales.shape != (experts, rows, half * MXFP4_CODES_PER_BYTE // MXFP4_GROUP):
            raise ValueError(
                f"MXFP4 scales {tuple(self.scales.shape)} do not fit codes {tuple(self.codes.shape)}"
            )
        if (
            half % (MXFP4_GROUP // MXFP4_CODES_PER_BYTE)
            or self.codes.stride(-1) != 1
            or self.scales.stride(-1) != 1
        ):
            raise ValueError("MXFP4 rows are whole 32-input groups, contiguous along the inputs")

    @property
    def shape(self) -> tuple[int, int, int]:
        experts, rows, half = self.codes.shape
        return experts, rows, half * MXFP4_CODES_PER_BYTE
