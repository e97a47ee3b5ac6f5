"""Unpack the 4-bit checkpoint formats into Int4Weight (codes [out, in], per-group scales and zeros).

Each format packs eight 4-bit values into an int32, value i of a word in bits 4i..4i+3, but along
different axes and orders:
- GPTQ: qweight [in / 8, out] packed along the inputs; qzeros [groups, out / 8] packed along the
  outputs and stored minus one (the original "gptq" format; "gptq_v2" stores the zero itself);
  scales [groups, out].
- AWQ (GEMM layout): qweight [in, out / 8] and qzeros [groups, out / 8] packed along the outputs in
  the interleaved order 0, 2, 4, 6, 1, 3, 5, 7 (word slot i holds output 8c + AWQ_ORDER[i]); scales
  [groups, out].
- compressed-tensors pack-quantized: weight_packed [out, in / 8] packed along the inputs, signed
  values stored plus 8 (symmetric: zero point 8); weight_scale [out, groups]; weight_shape [2].
"""

from __future__ import annotations

import torch

from batchlm.layers.quantization.forms import Int4Weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Output j of a word sits in slot AWQ_SLOT[j].
AWQ_SLOT = tuple(AWQ_ORDER.index(j) for j in range(8))
SYMMETRIC_ZERO = 8


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> uint8 [..., 8 C]: slot i of word c becomes element 8 c + i."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    values = (words.to(torch.int32)[..., None] >> shifts) & 0xF
    return values.reshape(*words.shape[:-1], words.shape[-1] * 8).to(torch.uint8)


def _group_size(group_size: int, in_features: int) -> int:
    return in_features if group_size <= 0 else group_size


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, zeros_minus_one: bool
) -> Int4Weight:
    codes = unpack_words(qweight.t().contiguous())  # [out, in]
    zeros = unpack_words(qzeros).t().contiguous()  # [out, groups]
    if zeros_minus_one:
        zeros = zeros + 1
    return Int4Weight(codes, scales.t().contiguous(), zeros, _group_size(group_size, codes.shape[1]))


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> Int4Weight:
    codes = _awq_outputs(unpack_words(qweight)).t().contiguous()  # [in, out] -> [out, in]
    zeros = _awq_outputs(unpack_words(qzeros)).t().contiguous()  # [groups, out] -> [out, groups]
    return Int4Weight(codes, scales.t().contiguous(), zeros, _group_size(group_size, codes.shape[1]))


def _awq_outputs(slots: torch.Tensor) -> torch.Tensor:
    """Undo AWQ's interleaving: [rows, 8 C] in slot order -> [rows, 8 C] in output order."""
    rows, cols = slots.shape
    order = torch.tensor(AWQ_SLOT, device=slots.device)
    return slots.reshape(rows, cols // 8, 8).index_select(2, order).reshape(rows, cols)


def unpack_compressed_int4(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor
) -> Int4Weight:
    out_features, in_features = (int(v) for v in weight_shape.tolist())
    codes = unpack_words(weight_packed)[:, :in_features]
    if tuple(codes.shape) != (out_features, in_features):
        raise ValueError(
            f"weight_packed holds {tuple(codes.shape)} values, weight_shape says {(out_features, in_features)}"
        )
    groups = weight_scale.shape[1]
    zeros = torch.full((out_features, groups), SYMMETRIC_ZERO, dtype=torch.uint8, device=codes.device)
    return Int4Weight(codes, weight_scale.contiguous(), zeros, in_features // groups)
