"""The Triton attention kernels at head dims that are not a power of two (Phi-3's 96, Phi-2's 80) and
GQA groups of 3 and 7, run on the CPU through Triton's interpreter against the plain-torch references:
the kernels pad such a head to the next power of two (tl.arange needs one), and the padding must
neither read past a head nor change a result. tests/gpu/test_kernels_real_shapes.py runs these
shapes, and more, on a GPU."""

from __future__ import annotations

from interpreter_harness import run_interpreted

INTERPRET_CHECK = """
import math

import torch

# Triton 3.6's interpreter turns a loop bound into an index with int(array), which NumPy 2.4
# refuses for a one-element array; tests/gpu/conftest.py patches it the same way.
from triton.runtime import interpreter

patch_tensor = interpreter._patch_lang_tensor


def patched(tensor, scope):
    patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = patched

from batchlm.kernels.fused_ops import rotary_embedding_, rotary_embedding_reference
from batchlm.kernels.kv_write import rotate_and_write_kv_cache, write_kv_cache
from batchlm.kernels.paged_decode import paged_decode_attention
from batchlm.kernels.paged_prefill import paged_prefill_attention
from batchlm.kernels.reference import paged_attention_reference, write_kv_cache_reference

BLOCK = 16
generator = torch.Generator().manual_seed(0)


def problem(heads, kv_heads, head_dim, seq_lens, rows, dtype):
    needed = [math.ceil(s / BLOCK) for s in seq_lens]
    num_blocks = sum(needed)  # no spare block: a read past the last head would leave the cache
    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, head_dim, generator=generator).to(dtype)
    perm = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    used = 0
    for row, count in enumerate(needed):
        tables[row, :count] = perm[used : used + count].int()
        used += count
    query = torch.randn(rows, heads, head_dim, generator=generator).to(dtype)
    return cache, tables, query


for heads, kv_heads, head_dim, dtype in [(6, 2, 96, torch.float16), (14, 2, 80, torch.float32)]:
    atol = 4e-3 if dtype == torch.float16 else 1e-4
    scale = head_dim**-0.5
    seq_lens = [5, 40, 70]
    cache, tables, query = problem(heads, kv_heads, head_dim, seq_lens, len(seq_lens), dtype)
    ref = paged_attention_reference(query, cache, [0, 1, 2, 3], seq_lens, tables, scale)
    # A split's first tile read early and its newest rows (or all of it) read again: the same result.
    for splits, newest in ((1, None), (4, None), (4, 1), (4, 3)):
        out = torch.full_like(query, float("nan"))
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        paged_decode_attention(query, cache, lens, tables, scale, out=out, num_splits=splits, newest=newest)
        error = (out.float() - ref).abs().max().item()
        assert error < atol, ("decode", head_dim, splits, newest, error)

    seq_lens, starts = [20, 45], [0, 20, 50]  # a fresh prompt and a chunk after 15 cached tokens
    cache, tables, query = problem(heads, kv_heads, head_dim, seq_lens, starts[-1], dtype)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(
        query, cache, torch.tensor(starts, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
        tables, scale, 30, out=out,
    )
    ref = paged_attention_reference(query, cache, starts, seq_lens, tables, scale)
    error = (out.float() - ref).abs().max().item()
    assert error < atol, ("prefill", head_dim, error)

    cache = torch.randn(2, 2, BLOCK, kv_heads, head_dim, generator=generator).to(dtype)
    expected = cache.clone()
    key, value = (torch.randn(5, kv_heads, head_dim, generator=generator).to(dtype) for _ in "kv")
    slots = torch.tensor([2 * BLOCK - 1, -1, 0, 17, 3])  # the cache's last row first
    write_kv_cache(key, value, cache, slots)
    write_kv_cache_reference(key, value, expected, slots)
    assert torch.equal(cache, expected), ("kv write", head_dim)

    # RoPE in place, and RoPE folded into the KV write, on q, k and v as views of one qkv row.
    rows, table = 6, torch.randn(64, head_dim, generator=generator)
    positions = torch.randint(0, 64, (rows,), generator=generator)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)

    def split(fused):
        q = fused[:, : heads * head_dim].view(rows, heads, head_dim)
        k = fused[:, heads * head_dim : (heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
        return q, k, fused[:, (heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)

    expected_qkv, expected_cache = qkv.clone(), torch.zeros(2, 1, BLOCK, kv_heads, head_dim, dtype=dtype)
    q, k, v = split(expected_qkv)
    reference_q = rotary_embedding_reference(positions, q, table)
    rotary_embedding_(positions, q, table)
    torch.testing.assert_close(q, reference_q, atol=atol, rtol=0.0)
    rotary_embedding_(positions, k, table)
    slots = torch.tensor([3, -1, 0, 15, 7])  # the sixth row: a graph's padded query, no slot
    write_kv_cache(k[:5], v[:5], expected_cache, slots)
    cache = torch.zeros_like(expected_cache)
    q, k, v = split(qkv)
    k_before = k.clone()
    rotate_and_write_kv_cache(positions, table, q, k, v, cache, slots)
    assert torch.equal(k, k_before)  # only the cache gets the rotated keys
    assert torch.equal(q, split(expected_qkv)[0]), ("rotated queries", head_dim)
    assert torch.equal(cache, expected_cache), ("rotated keys in the cache", head_dim)
print("attention kernels ok")
"""


def test_attention_kernels_pad_head_dims_that_are_not_powers_of_two() -> None:
    run_interpreted(INTERPRET_CHECK, "attention kernels ok")
