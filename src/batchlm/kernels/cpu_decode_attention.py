"""Decode attention on x86-64 CPUs straight from the paged KV cache, float32 or float16 (cpu_kernels.c,
see cpu_native.py): one query token per request, no gathered and padded copy of the contexts.

torch's path gathers every decode request's context into a padded [B, L, H_kv, D] copy and runs a
masked SDPA over it, several times slower than this kernel (BENCHMARKS.md, "CPU: serving against
llama.cpp's llama-server"). The kernel reads
each request's keys and values once, in block order.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from batchlm.kernels.cpu_native import pointer_of, probed

# The cache dtypes the kernel reads (float16 widened as it goes).
CACHE_DTYPES = (torch.float32, torch.float16)


def supports(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether paged_decode_attention can serve this layer's decodes (float32 queries on the CPU, a
    contiguous float32 or float16 cache, head_dim a multiple of 8, the library present)."""
    return (
        query.device.type == "cpu"
        and query.dtype == torch.float32
        and kv_cache.dtype in CACHE_DTYPES
        and kv_cache.is_contiguous()
        and query.shape[-1] % 8 == 0
        and decode_library() is not None
    )


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D]: one query per request
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, H_kv, D] float32 or float16
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32: context length per request, this step's token included
    scale: float,
    out: torch.Tensor,  # [B, H, D] float32, written in place
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [H]: each head's sink logit, or None
) -> None:
    """out[b] = softmax(query[b] K_b^T * scale) V_b over request b's first seq_lens[b] cached tokens
    (the last `window` of them on a sliding-window layer; scores soft-capped when softcap is set; with
    `sinks`, head h's softmax also holds sinks[h], a score without a value and never capped)."""
    library = decode_library()
    if library is None:
        raise RuntimeError("the CPU decode-attention kernel is not available on this machine")
    batch, heads, head_dim = query.shape
    if batch == 0:
        return
    if query.stride(2) != 1 or query.stride(1) != head_dim:
        query = query.contiguous()
    if out.stride(2) != 1 or out.stride(1) != head_dim:
        raise ValueError("out must have contiguous heads")
    tables = block_tables.to(torch.int32)
    if tables.stride(-1) != 1:
        tables = tables.contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    if sinks is not None:
        sinks = sinks.to(torch.float32).contiguous()  # a no-op for the layer's float32 parameter
    _, _, block_size, kv_heads, _ = kv_cache.shape
    status = library.batchlm_paged_decode(
        query.data_ptr(),
        query.stride(0),
        kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(),
        tables.data_ptr(),
        tables.stride(0),
        lens.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        batch,
        heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
        torch.get_num_threads(),
        window or 0,
        softcap or 0.0,
        pointer_of(sinks),
        kv_cache.dtype == torch.float16,
    )
    if status != 0:
        raise MemoryError("the CPU decode-attention kernel could not allocate its scratch memory")


@functools.cache
def decode_library() -> ctypes.CDLL | None:
    """The kernel library once its decode attention agreed with torch on a probe; None otherwise."""
    return probed("batchlm_paged_decode", _decode_agrees)


def _decode_agrees(library: ctypes.CDLL) -> bool:
    # Plain, with a 5-token window and a soft-cap, over a float16 cache, and with sinks beside a
    # window: each must match torch.
    return (
        _probe_case(library, 0, 0.0, torch.float32)
        and _probe_case(library, 5, 2.0, torch.float32)
        and _probe_case(library, 0, 0.0, torch.float16)
        and _probe_case(library, 5, 0.0, torch.float32, sinks=True)
    )


def _probe_case(
    library: ctypes.CDLL, window: int, cap: float, cache_dtype: torch.dtype, sinks: bool = False
) -> bool:
    generator = torch.Generator().manual_seed(0)
    block_size, kv_heads, heads, head_dim = 4, 2, 6, 16
    kv_cache = torch.randn(2, 9, block_size, kv_heads, head_dim, generator=generator).to(cache_dtype)
    tables = torch.tensor([[3, 1, 7, 0], [5, 2, 0, 0]], dtype=torch.int32)
    lens = [13, 6]
    lens_tensor = torch.tensor(lens, dtype=torch.int32)  # held: a temporary's data_ptr would dangle
    query = torch.randn(2, heads, head_dim, generator=generator)
    sink_logits = torch.linspace(-2.0, 2.0, heads) if sinks else None
    out = torch.empty_like(query)
    status = library.batchlm_paged_decode(
        query.data_ptr(), heads * head_dim, kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        tables.data_ptr(), 4, lens_tensor.data_ptr(), out.data_ptr(),
        heads * head_dim, 2, heads, kv_heads, head_dim, block_size, ctypes.c_float(0.25), 1,
        window, ctypes.c_float(cap), pointer_of(sink_logits), cache_dtype == torch.float16,
    )  # fmt: skip
    if status != 0:
        return False
    for row, length in enumerate(lens):
        blocks = tables[row, : -(-length // block_size)].long()
        first = max(0, length - window) if window else 0
        keys = (
            kv_cache[0, blocks]
            .flatten(0, 1)[first:length]
            .repeat_interleave(heads // kv_heads, dim=1)
            .float()
        )
        values = (
            kv_cache[1, blocks]
            .flatten(0, 1)[first:length]
            .repeat_interleave(heads // kv_heads, dim=1)
            .float()
        )
        scores = torch.einsum("hd,lhd->hl", query[row], keys) * 0.25
        if cap:
            scores = torch.tanh(scores / cap) * cap
        if sink_logits is not None:
            scores = torch.cat([scores, sink_logits[:, None]], dim=1)
        probs = torch.softmax(scores, dim=-1)[:, : values.shape[0]]
        expected = torch.einsum("hl,lhd->hd", probs, values)
        if not torch.allclose(out[row], expected, atol=1e-5, rtol=1e-4):
            return False
    return True
