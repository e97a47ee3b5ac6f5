"""Unpack the 4-bit checkpoint formats into Int4Weight (codes [out, in], per-group scales and zeros),
and GPTQ's 8-bit one, four codes a word in the same layout, into Int8Weight.

Each format packs eight 4-bit values into an int32, value i of a word in bits 4i..4i+3, but along
different axes and orders:
- GPTQ: qweight [in / 8, out] packed along the inputs; qzeros [groups, out / 8] packed along the
  outputs and stored minus one (the original "gptq" format; "gptq_v2" stores the zero itself);
  scales [groups, out].
- AWQ (GEMM layout): qweight [in, out / 8] and qzeros [groups, out / 8] packed along the outputs in
  the interleaved order 0, 2, 4, 6, 1, 3, 5, 7 (word slot i holds output 8c + AWQ_ORDER[i]); scales
  [groups, out].
- compressed-tensors pack-quantized: weight_packed [out, in / 8] packed along the inputs, signed
  values stored plus 8 (symmetric: zero point 8); weight_scale [out, groups]; weight_shape [2]. Its
  8-bit form (W8A16) packs four values a word, stored plus 128.
- compressed-tensors int-quantized: weight [out, in] int8 as it is, weight_scale per row, group or
  tensor (symmetric: the codes are the values plus 128 under zero point 128).

Act-order checkpoints (GPTQ desc_act, compressed-tensors group actorder) also store g_idx, the group
of each input: the groups are runs of inputs in the order the quantizer visited them. The codes are
stored in that order, so that groups are runs again, with the order kept (Int4Weight.input_order).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TypeVar

import torch

from batchlm.layers.quantization.forms import GroupedCodes, Int4Weight, Int8Weight

G = TypeVar("G", bound=GroupedCodes)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Output j of a word sits in slot AWQ_SLOT[j].
AWQ_SLOT = tuple(AWQ_ORDER.index(j) for j in range(8))
SYMMETRIC_ZERO = 8
# The smallest group the GPU 4-bit kernels tile (tl.dot needs K steps of 16).
MIN_GROUP = 16


def unpack_words(words: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [..., C] -> uint8 [..., n C] of n = 32 / bits values a word: slot i of word c becomes
    element n c + i."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    values = (words.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*words.shape[:-1], words.shape[-1] * shifts.numel()).to(torch.uint8)


def _group_size(group_size: int, in_features: int) -> int:
    return in_features if group_size <= 0 else group_size


def whole_groups(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    form: type[G],
) -> G:
    """The weight over groups that divide its inputs. A checkpoint whose inputs end in a partial group
    (576 inputs in groups of 128: five scales, the last for 64 inputs) is re-expressed exactly in groups
    of gcd(inputs, group size), each taking its original group's scale and zero point."""
    in_features = codes.shape[1]
    group_size = _group_size(group_size, in_features)
    groups = -(-in_features // group_size)
    if scales.shape[1] != groups or zeros.shape[1] != groups:
        raise ValueError(
            f"a weight of {in_features} inputs in groups of {group_size} needs {groups} scales and zero "
            f"points a row; the checkpoint has {scales.shape[1]} and {zeros.shape[1]}"
        )
    if in_features % group_size == 0:
        return form(codes, scales, zeros, group_size)
    finer = math.gcd(in_features, group_size)
    if finer % MIN_GROUP:
        raise ValueError(
            f"a weight of {in_features} inputs in groups of {group_size} ends in a partial group, and "
            f"whole groups that cover it would hold {finer} inputs: the 4-bit kernels take multiples of "
            f"{MIN_GROUP}"
        )
    count, repeat = in_features // finer, group_size // finer
    return form(
        codes,
        scales.repeat_interleave(repeat, dim=1)[:, :count].contiguous(),
        zeros.repeat_interleave(repeat, dim=1)[:, :count].contiguous(),
        finer,
    )


def act_order(g_idx: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor | None:
    """The input order in which `g_idx` (each input's group) puts the groups as runs of `group_size`
    inputs (the last may be shorter); None where it already does in the inputs' own order."""
    size = _group_size(group_size, in_features)
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx has shape {list(g_idx.shape)}; the weight has {in_features} inputs")
    groups = g_idx.to(torch.int64)
    runs = torch.arange(in_features, device=groups.device) // size
    if torch.equal(groups, runs):
        return None
    order = torch.argsort(groups, stable=True)
    if not torch.equal(groups[order], runs):
        counts = torch.bincount(groups.clamp(min=0)).tolist()
        raise ValueError(
            f"g_idx puts {counts[:4]}... inputs in its groups; act order needs {size} in each (the last "
            "may hold fewer)"
        )
    return order


def _grouped_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int,
    order: torch.Tensor | None,
) -> Int4Weight | Int8Weight:
    """Int4Weight (Int8Weight for `bits` 8) over whole groups, its columns (read in input order) stored
    in act `order` where there is one."""
    form: type[Int4Weight] | type[Int8Weight] = Int8Weight if bits == 8 else Int4Weight
    weight = whole_groups(codes, scales, zeros, group_size, form)
    if order is None:
        return weight
    return replace(weight, codes=weight.codes.index_select(1, order).contiguous(), input_order=order)


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    zeros_minus_one: bool,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
) -> Int4Weight | Int8Weight:
    """Int4Weight, or Int8Weight for `bits` 8 (four codes a word)."""
    codes = unpack_words(qweight.t().contiguous(), bits)  # [out, in]
    zeros = unpack_words(qzeros, bits).t().contiguous()  # [out, groups]
    if bits == 8:
        zeros = zeros.to(torch.int16)  # the stored zero + 1 may be 256
    if zeros_minus_one:
        zeros = zeros + 1
    order = None if g_idx is None else act_order(g_idx, group_size, codes.shape[1])
    return _grouped_codes(codes, scales.t().contiguous(), zeros, group_size, bits, order)


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> Int4Weight:
    codes = _awq_outputs(unpack_words(qweight)).t().contiguous()  # [in, out] -> [out, in]
    zeros = _awq_outputs(unpack_words(qzeros)).t().contiguous()  # [groups, out] -> [out, groups]
    return whole_groups(codes, scales.t().contiguous(), zeros, group_size, Int4Weight)


def _awq_outputs(slots: torch.Tensor) -> torch.Tensor:
    """Undo AWQ's interleaving: [rows, 8 C] in slot order -> [rows, 8 C] in output order."""
    rows, cols = slots.shape
    order = torch.tensor(AWQ_SLOT, device=slots.device)
    return slots.reshape(rows, cols // 8, 8).index_select(2, order).reshape(rows, cols)


def unpack_int8_weight(weight: torch.Tensor, weight_scale: torch.Tensor, group_size: int) -> Int8Weight:
    """compressed-tensors' int-quantized weight: int8 values [out, in] as stored, symmetric, with one
    scale per row ([out, 1]), per group of `group_size` inputs ([out, groups]) or for the tensor."""
    if weight.dtype != torch.int8:
        raise ValueError(f"an int-quantized weight must be stored as int8, not {weight.dtype}")
    rows, cols = weight.shape
    scales = weight_scale.reshape(1, 1) if weight_scale.numel() == 1 else weight_scale
    scales = scales.expand(rows, -1).contiguous() if scales.shape[0] == 1 else scales.contiguous()
    codes = (weight.to(torch.int16) + 128).to(torch.uint8)
    zeros = torch.full((rows, scales.shape[1]), 128, dtype=torch.int16, device=weight.device)
    return whole_groups(codes, scales, zeros, group_size if group_size > 0 else cols, Int8Weight)


def unpack_compressed_int4(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shape: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
) -> Int4Weight | Int8Weight:
    """Int4Weight, or Int8Weight for `bits` 8 (W8A16: four codes a word, stored plus 128)."""
    out_features, in_features = (int(v) for v in weight_shape.tolist())
    codes = unpack_words(weight_packed, bits)[:, :in_features]
    if tuple(codes.shape) != (out_features, in_features):
        raise ValueError(
            f"weight_packed holds {tuple(codes.shape)} values, weight_shape says {(out_features, in_features)}"
        )
    groups = weight_scale.shape[1]
    zero, dtype = (SYMMETRIC_ZERO, torch.uint8) if bits == 4 else (1 << (bits - 1), torch.int16)
    zeros = torch.full((out_features, groups), zero, dtype=dtype, device=codes.device)
    order = None if g_idx is None else act_order(g_idx, group_size, in_features)
    return _grouped_codes(codes, weight_scale.contiguous(), zeros, group_size, bits, order)
