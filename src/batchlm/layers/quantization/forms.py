"""Quantized safetensors weights as the loader hands them to a layer: one object per HF weight, in one
layout of ours whatever the checkpoint's packing (GPTQ, AWQ, compressed-tensors).

Like a GGUF QuantizedTensor, each form is a logical [rows, cols] matrix (rows = output features)
that fused shards and tensor-parallel splits slice by rows, or by columns on group edges.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Self

import torch

from batchlm.kernels.fp8_types import FP8_DTYPE, FP8_MAX

# FP8 tensor-core instructions (cuBLASLt's FP8 GEMM, Triton's e4m3 casts) start with Ada (sm_89).
FP8_MIN_CAPABILITY = (8, 9)


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU with FP8 matmuls (Ada, Hopper and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def check_fp8_device(device: torch.device, what: str) -> None:
    """ValueError naming `what` on a CUDA GPU older than Ada / Hopper (other devices emulate FP8)."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"{what} needs an NVIDIA GPU with FP8 support (compute capability 8.9+: Ada, Hopper); "
            f"this one is {capability[0]}.{capability[1]}"
        )


@dataclass(frozen=True)
class Fp8Weight:
    """FP8 e4m3 values with one float32 scale per row: w = data * scale[:, None]. A per-tensor scale
    arrives expanded to every row. `input_scale` is the static activation scale (None: dynamic)."""

    data: torch.Tensor  # [rows, cols] float8_e4m3fn
    scale: torch.Tensor  # [rows] float32
    input_scale: float | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def narrow_rows(self, start: int, length: int) -> Fp8Weight:
        return Fp8Weight(
            self.data.narrow(0, start, length), self.scale.narrow(0, start, length), self.input_scale
        )

    def narrow_cols(self, start: int, length: int) -> Fp8Weight:
        return Fp8Weight(self.data.narrow(1, start, length), self.scale, self.input_scale)

    def select_rows(self, order: torch.Tensor) -> Fp8Weight:
        return Fp8Weight(
            self.data.index_select(0, order), self.scale.index_select(0, order), self.input_scale
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale.float()[:, None]).to(dtype)


@dataclass(frozen=True)
class GroupedCodes:
    """Integer codes with a scale and a zero point per group of `group_size` stored columns of a row:
    w[r, c] = (codes[r, c] - zeros[r, c // g]) * scales[r, c // g] (Int4Weight, Int8Weight).

    `input_order` (act-order GPTQ, compressed-tensors' group actorder) says which layer input each
    stored column multiplies: the checkpoint's groups are runs of inputs in that order, not in the
    layer's, so the columns are stored in it and a product gathers its inputs the same way
    (x[:, input_order] @ codes' values^T). None: column c is input c."""

    codes: torch.Tensor  # [rows, cols] uint8
    scales: torch.Tensor  # [rows, cols // group_size], the checkpoint's float dtype
    zeros: torch.Tensor  # [rows, cols // group_size] integers
    group_size: int
    input_order: torch.Tensor | None = None  # [cols] int64, a permutation of 0..cols-1

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def narrow_rows(self, start: int, length: int) -> Self:
        return replace(
            self,
            codes=self.codes.narrow(0, start, length),
            scales=self.scales.narrow(0, start, length),
            zeros=self.zeros.narrow(0, start, length),
        )

    def select_rows(self, order: torch.Tensor) -> Self:
        return replace(
            self,
            codes=self.codes.index_select(0, order),
            scales=self.scales.index_select(0, order),
            zeros=self.zeros.index_select(0, order),
        )

    def narrow_cols(self, start: int, length: int) -> Self:
        """Columns [start, start + length); both must fall on group edges."""
        if start == 0 and length == self.shape[1]:
            return self
        g = self.group_size
        if self.input_order is not None:
            # A rank's inputs are a range of the layer's; in act order they are spread over every group.
            raise ValueError(
                "act-order quantized weights (GPTQ desc_act, compressed-tensors group actorder) do not "
                "split by inputs across tensor-parallel ranks; serve them with --tensor-parallel-size 1"
            )
        if start % g or length % g:
            raise ValueError(
                f"a weight quantized in groups of {g} inputs splits only on group edges; columns "
                f"{start}..{start + length} do not (choose another tensor-parallel size)"
            )
        first, count = start // g, length // g
        return replace(
            self,
            codes=self.codes.narrow(1, start, length),
            scales=self.scales.narrow(1, first, count),
            zeros=self.zeros.narrow(1, first, count),
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [rows, cols] values in the layer's input order."""
        per_column = self.group_size
        scales = self.scales.float().repeat_interleave(per_column, dim=1)
        zeros = self.zeros.float().repeat_interleave(per_column, dim=1)
        values = ((self.codes.float() - zeros) * scales).to(dtype)
        return values if self.input_order is None else in_input_order(values, self.input_order)


@dataclass(frozen=True)
class Int4Weight(GroupedCodes):
    """4-bit codes (0..15) in groups; zeros uint8 (symmetric formats have 8; GPTQ's stored zero + 1
    may reach 16)."""


@dataclass(frozen=True)
class Int8Weight(GroupedCodes):
    """8-bit codes (0..255) in groups (GPTQ's 8-bit checkpoints); zeros int16 (GPTQ's stored zero + 1
    may reach 256)."""


def in_input_order(stored: torch.Tensor, input_order: torch.Tensor) -> torch.Tensor:
    """[rows, cols] columns stored in `input_order` -> the same columns in the layer's input order."""
    out = torch.empty_like(stored)
    out[:, input_order.to(stored.device)] = stored
    return out


def quantize_fp8_rows(weight: torch.Tensor) -> Fp8Weight:
    """Per-row (per output channel) FP8 of a dense weight: each row's largest magnitude maps to 448."""
    values = weight.float()
    amax = values.abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    data = (values / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Weight(data, scale)
