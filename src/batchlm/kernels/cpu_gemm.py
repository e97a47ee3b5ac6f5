"""float32 matmuls on x86-64 CPUs through our AVX2/FMA GEMM kernel (cpu_kernels.c, see cpu_native.py).

Weights are packed once, after loading, into 16-column panels ([ceil(N/16), K, 16]): each panel is
one contiguous stream, so a decode step's few rows read every weight exactly once at memory speed,
and a prefill chunk reuses each panel from cache. It runs decode and prefill matmuls faster than
torch's BLAS (BENCHMARKS.md, "CPU: serving against llama.cpp's llama-server").

Where the kernel library is unavailable `gemm_library()` is None and layers keep torch's matmul.
Results differ from torch's by float32 rounding (another summation order).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from batchlm.kernels.cpu_native import PANEL, pointer_of, probed


@dataclass(frozen=True)
class PackedWeight:
    """A [out_features, in_features] float32 weight as 16-column panels: panels[p, k, j] = W[16p + j, k]
    (zero past out_features)."""

    panels: torch.Tensor
    out_features: int
    in_features: int


def can_pack(weight: torch.Tensor) -> bool:
    """Whether this weight can move to the kernel: a 2-D float32 CPU tensor, with the kernel present."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and gemm_library() is not None
    )


def pack_weight(weight: torch.Tensor) -> PackedWeight:
    """Panel-major float32 copy of a 2-D [out, in] weight."""
    out_features, in_features = weight.shape
    num_panels = -(-out_features // PANEL)
    padded = torch.zeros(num_panels * PANEL, in_features, dtype=torch.float32)
    padded[:out_features] = weight.detach()
    panels = padded.view(num_panels, PANEL, in_features).transpose(1, 2).contiguous()
    return PackedWeight(panels, out_features, in_features)


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias for float32 CPU x [..., in_features]; needs gemm_library() (not None)."""
    library = gemm_library()
    if library is None:
        raise RuntimeError("the CPU GEMM kernel is not available on this machine")
    rows = x.reshape(-1, weight.in_features)
    if rows.dtype != torch.float32:
        rows = rows.float()
    if rows.stride(-1) != 1 or rows.stride(0) < weight.in_features:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], weight.out_features, dtype=torch.float32)
    if bias is not None:
        bias = bias.float().contiguous()
    if rows.shape[0] > 0:
        library.batchlm_gemm_f32(
            rows.data_ptr(),
            rows.stride(0),
            weight.panels.data_ptr(),
            PANEL,
            PANEL * weight.in_features,
            pointer_of(bias),
            out.data_ptr(),
            weight.out_features,
            rows.shape[0],
            weight.out_features,
            weight.in_features,
            torch.get_num_threads(),
        )
    return out.view(*x.shape[:-1], weight.out_features)


@functools.cache
def gemm_library() -> ctypes.CDLL | None:
    """The kernel library once its GEMM agreed with torch on a probe; None where it cannot be used."""
    return probed("batchlm_gemm_f32", _gemm_agrees)


def _gemm_agrees(library: ctypes.CDLL) -> bool:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 37, generator=generator)
    weight = torch.randn(21, 37, generator=generator)
    bias = torch.randn(21, generator=generator)
    packed = pack_weight(weight)
    out = torch.empty(7, 21)
    library.batchlm_gemm_f32(
        x.data_ptr(), 37, packed.panels.data_ptr(), PANEL, PANEL * 37, bias.data_ptr(), out.data_ptr(), 21,
        7, 21, 37, torch.get_num_threads(),
    )  # fmt: skip
    return torch.allclose(out, torch.addmm(bias, x, weight.t()), atol=1e-4, rtol=1e-4)
