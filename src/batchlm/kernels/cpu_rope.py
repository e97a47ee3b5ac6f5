"""RoPE on x86-64 CPUs (cpu_kernels.c, see cpu_native.py): queries and keys of a step rotated in one
parallel pass, where torch's path takes a gather of the cos/sin rows and six elementwise ops, each
its own pass and its own wake-up of the OpenMP threads. The same products and sums, rounded one by
one (no fused multiply-add), so the results equal torch's bit for bit (tests/test_cpu_rope.py)."""

from __future__ import annotations

import ctypes
import functools

import torch

from batchlm.kernels.cpu_native import probed, threads_for_rows


@functools.cache
def rope_library() -> ctypes.CDLL | None:
    """The kernel library once its RoPE agreed with torch's on a probe; None otherwise."""
    return probed("batchlm_rope", _rope_agrees)


def rotate_native(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """x [T, H, D] (float32, heads contiguous within a token) rotated by rows `positions` of the cos | sin
    table [max_position, D] into a new contiguous tensor; None where the kernel does not take these
    tensors (the caller then rotates with torch)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or table.dtype != torch.float32 or x.dim() != 3:
        return None
    tokens, heads, head_dim = x.shape
    if head_dim % 2 or table.shape[-1] != head_dim or x.stride(2) != 1 or x.stride(1) != head_dim:
        return None
    if not table.is_contiguous() or positions.shape != (tokens,):
        return None
    library = rope_library()
    if library is None:
        return None
    positions = positions.to(torch.int64).contiguous()  # itself when it already is
    out = torch.empty(x.shape, dtype=x.dtype)
    outside = library.batchlm_rope(
        x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), table.data_ptr(), table.shape[0],
        table.stride(0), positions.data_ptr(), tokens, heads, head_dim,
        threads_for_rows(tokens),
    )  # fmt: skip
    if outside:
        raise IndexError(f"{outside} position(s) past the RoPE table's {table.shape[0]} rows")
    return out


def _rope_agrees(library: ctypes.CDLL) -> bool:
    # Heads of 40 values (two whole vectors and a scalar tail a half) at scattered positions, against
    # torch's ops.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 40, generator=generator) * 10
    table = torch.randn(16, 40, generator=generator)
    positions = torch.tensor([3, 0, 15, 7, 7])
    ours = torch.empty_like(x)
    library.batchlm_rope(
        x.data_ptr(), x.stride(0), ours.data_ptr(), ours.stride(0), table.data_ptr(), 16, table.stride(0),
        positions.data_ptr(), 5, 3, 40, 2,
    )  # fmt: skip
    cos, sin = table.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    theirs = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
