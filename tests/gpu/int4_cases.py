"""What the quantized-kernel GPU tests share: random packed int4 weights and a relative-error check."""

from __future__ import annotations

import torch
from devices import DEVICE

from batchlm.kernels.int4_pack import PackedInt4, pack_int4


def assert_relative(out: torch.Tensor, ref: torch.Tensor, tolerance: float) -> None:
    assert not out.isnan().any()
    assert float((out.float() - ref).abs().max()) <= tolerance * float(ref.abs().max())


def random_packed(
    out_features: int, in_features: int, group: int, dtype: torch.dtype, seed: int = 0, zero_limit: int = 16
) -> tuple[PackedInt4, torch.Tensor]:
    """Random codes, group scales (dtype) and zero points below zero_limit, packed; and the codes."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scales = torch.rand(out_features, in_features // group, generator=generator) * 0.02 + 0.001
    zeros = torch.randint(
        0, zero_limit, (out_features, in_features // group), generator=generator, dtype=torch.uint8
    )
    return pack_int4(codes.to(DEVICE), scales.to(DEVICE, dtype), zeros.to(DEVICE), group), codes
