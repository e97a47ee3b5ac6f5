"""Token sampling on x86-64 CPUs by inverse CDF (cpu_kernels.c, see cpu_native.py): one uniform per row
instead of Exponential noise over the whole vocabulary.

The exponential race the sampler uses elsewhere (argmax of logits - log E) needs a float64 uniform
and a log per vocabulary entry, an order of magnitude slower than this (BENCHMARKS.md, "CPU: serving
against llama.cpp's llama-server"). Here
each row costs one pass of vectorized exp for the softmax mass (kept per block of 256 tokens) and a
walk through the one block where the draw falls. Both draw exactly from softmax(logits / T).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from batchlm.kernels.cpu_native import probed


def supports(logits: torch.Tensor) -> bool:
    """Whether sample_rows can draw from these logits (float32 [B, V] on the CPU, library present)."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and sample_library() is not None
    )


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids [B] int64: row b drawn from softmax(logits[b] / temperature[b]) with the uniform
    uniforms[b] in [0, 1) (argmax where temperature[b] <= 0). -inf logits are never drawn."""
    library = sample_library()
    if library is None:
        raise RuntimeError("the CPU sampling kernel is not available on this machine")
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    temperature = temperature.to(torch.float32).contiguous()
    uniforms = uniforms.to(torch.float64).contiguous()
    if temperature.shape != (rows,) or uniforms.shape != (rows,):
        raise ValueError(f"temperature and uniforms must be [{rows}]")
    out = torch.empty(rows, dtype=torch.int64)
    if rows == 0:
        return out
    status = library.batchlm_sample_f32(
        logits.data_ptr(),
        logits.stride(0),
        rows,
        vocab,
        temperature.data_ptr(),
        uniforms.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU sampling kernel could not allocate its scratch memory")
    return out


@functools.cache
def sample_library() -> ctypes.CDLL | None:
    """The kernel library once its sampling agreed with exact expectations on a probe; None otherwise."""
    return probed("batchlm_sample_f32", _sample_agrees)


def _sample_agrees(library: ctypes.CDLL) -> bool:
    neg = float("-inf")
    logits = torch.tensor(
        [
            [0.0, 3.0, 1.0, 2.0] + [0.0] * 300,  # temperature 0: the argmax, 1
            [neg, neg, 5.0, neg] + [neg] * 300,  # one token left: 2
            [0.0, 0.0, 0.0, 0.0] + [neg] * 300,  # uniform over 4, u = 0.6: mass passes 2.4 at token 2
            [neg] * 300 + [0.0, 0.0, 0.0, 0.0],  # the same in the last block, u = 0.9: token 303
        ]
    )
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.0])
    uniforms = torch.tensor([0.5, 0.99, 0.6, 0.9], dtype=torch.float64)
    out = torch.empty(4, dtype=torch.int64)
    status = library.batchlm_sample_f32(
        logits.data_ptr(), logits.stride(0), 4, logits.shape[1], temperature.data_ptr(), uniforms.data_ptr(),
        out.data_ptr(), 1,
    )  # fmt: skip
    return status == 0 and out.tolist() == [1, 2, 2, 303]
