"""The one 4-bit weight layout our W4A16 kernel reads (plain torch: packing runs on any device).

Codes are packed along the input dimension, eight per int32, code k % 8 in bits 4 (k % 8) and up, so
a [BLOCK_K, BLOCK_N] tile of the kernel reads [BLOCK_K / 8, BLOCK_N] whole words in rows of N, and a
warp's loads along N are contiguous. Scales and zero points are [groups, N] in the scale dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODES_PER_WORD = 8


@dataclass(frozen=True)
class PackedInt4:
    """w[n, k] = (code(k, n) - zeros[k // g, n]) * scales[k // g, n] for a [N, K] weight."""

    qweight: torch.Tensor  # [K / 8, N] int32
    scales: torch.Tensor  # [K / g, N]
    zeros: torch.Tensor  # [K / g, N], same dtype as scales (small integers, exact)
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * CODES_PER_WORD

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[1])


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> PackedInt4:
    """codes [N, K] uint8 (0..15), scales and zeros [N, K / g] -> the kernel layout."""
    out_features, in_features = codes.shape
    if in_features % CODES_PER_WORD:
        raise ValueError(f"4-bit weights need a multiple of {CODES_PER_WORD} inputs, not {in_features}")
    by_k = codes.t().to(torch.uint8).reshape(in_features // 2, 2, out_features)
    # Two codes per byte (the lower k in the low nibble), four bytes little-endian per int32.
    pairs = by_k[:, 0, :] | (by_k[:, 1, :] << 4)  # [K / 2, N]
    words = pairs.reshape(in_features // CODES_PER_WORD, 4, out_features).permute(0, 2, 1).contiguous()
    qweight = words.view(torch.int32).reshape(in_features // CODES_PER_WORD, out_features)
    return PackedInt4(qweight, scales.t().contiguous(), zeros.t().to(scales.dtype).contiguous(), group_size)


def unpack_codes(packed: PackedInt4) -> torch.Tensor:
    """The [N, K] uint8 codes back from the packed words."""
    words = packed.qweight.contiguous().view(torch.uint8).reshape(-1, packed.out_features, 4)
    pairs = words.permute(0, 2, 1).reshape(-1, packed.out_features)  # [K / 2, N]
    low, high = pairs & 0xF, pairs >> 4
    return torch.stack((low, high), dim=1).reshape(packed.in_features, packed.out_features).t()


def dequantize_packed(packed: PackedInt4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight the packed codes stand for."""
    g = packed.group_size
    scales = packed.scales.float().t().repeat_interleave(g, dim=1)
    zeros = packed.zeros.float().t().repeat_interleave(g, dim=1)
    return ((unpack_codes(packed).float() - zeros) * scales).to(dtype)
