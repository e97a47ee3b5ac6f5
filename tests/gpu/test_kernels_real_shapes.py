"""The Triton attention kernels at the head geometries of real checkpoints: head dims that are not a
power of two (Phi-3 96, Phi-2 80, padded to the next one inside the kernels), Gemma's 256, and GQA
groups of 3, 5 and 7 (SmolLM2, Qwen2.5), with windows, soft-caps and an FP8 cache, against the
plain-torch references. tests/gpu/test_kernels.py covers the power-of-two shapes in depth.

GPU only (marked `gpu`); TRITON_INTERPRET=1 runs the 16-bit cases on the CPU in fp16 (the
interpreter's bf16 dot is broken; FP8 and start-up compiles need a GPU).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from devices import DEVICE, HALF, HALF_ATOL, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from batchlm.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from batchlm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from batchlm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from batchlm.kernels.kv_write import write_kv_cache  # noqa: E402
from batchlm.kernels.paged_decode import paged_decode_attention  # noqa: E402
from batchlm.kernels.paged_prefill import paged_prefill_attention  # noqa: E402
from batchlm.kernels.reference import paged_attention_reference, write_kv_cache_reference  # noqa: E402
from models_harness import Chunk, build_step  # noqa: E402

FP8 = torch.float8_e4m3fn
BLOCK = 16
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 and compiles need a GPU")

# (query heads, KV heads, head dim) of one attention layer.
SHAPES = {
    "phi3-mini": (32, 32, 96),
    "phi2": (32, 32, 80),
    "gemma2-2b": (8, 4, 256),
    "gemma3-1b": (4, 1, 256),
    "smollm2-135m": (9, 3, 64),
    "smollm2-360m": (15, 5, 64),
    "qwen2.5-0.5b": (14, 2, 64),
    "llama3-8b": (32, 8, 128),
}
# Head dims that are not powers of two, with GQA groups of 1, 3 and 7.
ODD_SHAPES = {"phi3-mini": (32, 32, 96), "hd96-group3": (9, 3, 96), "hd80-group7": (14, 2, 80)}


def block_tables(seq_lens: list[int], num_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """Distinct shuffled blocks per request, padded with block 0."""
    needed = [math.ceil(s / BLOCK) for s in seq_lens]
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    table = torch.zeros(len(seq_lens), max(needed) + 2, dtype=torch.int32)
    used = 0
    for row, count in enumerate(needed):
        table[row, :count] = torch.tensor(perm[used : used + count], dtype=torch.int32)
        used += count
    return table.to(DEVICE)


def random_problem(
    shape: tuple[int, int, int], seq_lens: list[int], rows: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cache, block tables, queries [rows, heads, head_dim]) of N(0, 1) values."""
    heads, kv_heads, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(s / BLOCK) for s in seq_lens) + 4
    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, head_dim, generator=generator).to(HALF)
    query = torch.randn(rows, heads, head_dim, generator=generator).to(HALF)
    return cache.to(DEVICE), block_tables(seq_lens, num_blocks, generator), query.to(DEVICE)


def int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_decode_at_real_shapes(shape: tuple[int, int, int], num_splits: int | None) -> None:
    seq_lens = [1, 17, 100, 300, 0]  # the last: a padding row, zeros
    cache, tables, query = random_problem(shape, seq_lens, len(seq_lens), seed=1)
    scale = shape[2] ** -0.5
    out = torch.full_like(query, float("nan"))  # poisoned: every element must be written
    paged_decode_attention(query, cache, int32(seq_lens), tables, scale, out=out, num_splits=num_splits)
    ref = paged_attention_reference(query, cache, list(range(len(seq_lens) + 1)), seq_lens, tables, scale)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=HALF_ATOL, rtol=0.0)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_prefill_at_real_shapes(shape: tuple[int, int, int]) -> None:
    contexts, chunks = [0, 45, 16], [37, 1, 70]
    seq_lens = [c + n for c, n in zip(contexts, chunks, strict=True)]
    starts = [0, 37, 38, 108]
    cache, tables, query = random_problem(shape, seq_lens, starts[-1], seed=2)
    scale = shape[2] ** -0.5
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(query, cache, int32(starts), int32(seq_lens), tables, scale, max(chunks), out=out)
    ref = paged_attention_reference(query, cache, starts, seq_lens, tables, scale)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=HALF_ATOL, rtol=0.0)


@pytest.mark.parametrize("shape", list(ODD_SHAPES.values()), ids=list(ODD_SHAPES))
def test_kv_write_at_head_dims_that_are_not_powers_of_two(shape: tuple[int, int, int]) -> None:
    _, kv_heads, head_dim = shape
    generator = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 6, BLOCK, kv_heads, head_dim, generator=generator).to(HALF).to(DEVICE)
    expected = cache.clone()
    # Keys and values as views of a fused projection output; the last slot is the cache's last row,
    # so a read or write past the head would leave the tensor.
    fused = torch.randn(20, 3, kv_heads, head_dim, generator=generator).to(HALF).to(DEVICE)
    slots = torch.randperm(6 * BLOCK - 1, generator=generator)[:20].to(DEVICE)
    slots[0] = 6 * BLOCK - 1
    slots[::6] = -1
    write_kv_cache(fused[:, 1], fused[:, 2], cache, slots)
    write_kv_cache_reference(fused[:, 1], fused[:, 2], expected, slots)
    assert torch.equal(cache, expected)


WINDOW_SPECS = [
    AttentionSpec(0.125, sliding_window=20),
    AttentionSpec(0.5, logit_softcap=3.0),
    AttentionSpec(0.5, sliding_window=37, logit_softcap=3.0),
]
# Decodes longer and shorter than the windows, a fresh prompt and a chunk after a cached context.
WINDOW_CHUNKS = [
    Chunk([1], 150, list(range(0, 10))),
    Chunk([1], 9, [10]),
    Chunk(list(range(70)), 0, list(range(11, 16))),
    Chunk(list(range(45)), 83, list(range(16, 24))),
]


def on_device(meta: AttentionMetadata) -> AttentionMetadata:
    moved = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        moved[name] = moved[name].to(DEVICE)
    return AttentionMetadata(**moved)


def step_tensors(shape: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, ...]:
    """A 24-block cache and the step's queries, keys and values for WINDOW_CHUNKS, float32 on the CPU."""
    heads, kv_heads, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(len(c.tokens) for c in WINDOW_CHUNKS)
    cache = torch.randn(2, 24, BLOCK, kv_heads, head_dim, generator=generator)
    q = torch.randn(tokens, heads, head_dim, generator=generator)
    k, v = (torch.randn(tokens, kv_heads, head_dim, generator=generator) for _ in "kv")
    return cache, q, k, v


WINDOW_SHAPES = {**ODD_SHAPES, "gemma2-2b": SHAPES["gemma2-2b"]}


@pytest.mark.parametrize("spec", WINDOW_SPECS, ids=lambda s: f"w{s.sliding_window}-cap{s.logit_softcap}")
@pytest.mark.parametrize("shape", list(WINDOW_SHAPES.values()), ids=list(WINDOW_SHAPES))
def test_windows_and_soft_caps_at_real_shapes(shape: tuple[int, int, int], spec: AttentionSpec) -> None:
    cache, q, k, v = (t.to(HALF) for t in step_tensors(shape, seed=4))
    _, _, meta = build_step(WINDOW_CHUNKS, BLOCK)
    expected = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), cache.float(), meta, spec)
    dev = [t.to(DEVICE) for t in (q, k, v, cache)]
    out = TritonAttentionBackend().forward(*dev, on_device(meta), spec)
    torch.testing.assert_close(out.float().cpu(), expected, atol=HALF_ATOL, rtol=0)


@needs_gpu
@pytest.mark.parametrize("spec", [AttentionSpec(0.125), *WINDOW_SPECS[2:]], ids=["plain", "window-cap"])
@pytest.mark.parametrize("shape", list(WINDOW_SHAPES.values()), ids=list(WINDOW_SHAPES))
def test_fp8_cache_at_real_shapes(shape: tuple[int, int, int], spec: AttentionSpec) -> None:
    """An FP8 cache read by decode and prefill (every split count the heuristics pick here). The new
    keys and values are e4m3 values times their scales, so the write stores them exactly and the
    torch backend over the dequantized cache is the reference up to the kernels' own rounding."""
    k_scale, v_scale = 0.5, 2.0
    cache, q, k, v = step_tensors(shape, seed=5)
    narrow = cache.to(FP8)
    k = k.to(FP8).float() * k_scale
    v = v.to(FP8).float() * v_scale
    dequantized = narrow.float()
    dequantized[0] *= k_scale
    dequantized[1] *= v_scale
    _, _, meta = build_step(WINDOW_CHUNKS, BLOCK)
    expected = TorchAttentionBackend().forward(q, k, v, dequantized, meta, spec)
    backend = TritonAttentionBackend()
    fp8_cache = narrow.to(DEVICE)
    backend.set_kv_scales([fp8_cache], [(k_scale, v_scale)])
    dev = [t.to(HALF).to(DEVICE) for t in (q, k, v)]
    out = backend.forward(*dev, fp8_cache, on_device(meta), spec)
    assert bool(out.isfinite().all())
    # bf16 queries, keys and values (exact here), and outputs up to v_scale = 2 in magnitude.
    torch.testing.assert_close(out.float().cpu(), expected, atol=2 * HALF_ATOL, rtol=0)


# The largest tiles: a padded head dim and the 256 one, with GQA groups of 1, 2 and 4.
COMPILE_SHAPES = {name: SHAPES[name] for name in ("phi3-mini", "gemma2-2b", "gemma3-1b")}


@needs_gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("shape", list(COMPILE_SHAPES.values()), ids=list(COMPILE_SHAPES))
def test_start_up_compiles_every_attention_variant_at_real_shapes(
    shape: tuple[int, int, int], cache_dtype: torch.dtype
) -> None:
    """Start-up's warm-up compiles each prefill tile and decode split count for the layers' windows and
    soft-caps: at every real shape each one must fit the GPU (shared memory, registers), or serving
    would meet the failure in its first long step instead."""
    heads, kv_heads, head_dim = shape
    cache = torch.zeros(2, 16, BLOCK, kv_heads, head_dim, device=DEVICE).to(cache_dtype)
    specs = [AttentionSpec(head_dim**-0.5), AttentionSpec(head_dim**-0.5, 4096, 50.0)]
    TritonAttentionBackend().warm_up(cache, heads, 16, specs, query_dtype=torch.bfloat16)
    torch.cuda.synchronize()


@pytest.mark.parametrize("head_dim", [8, 512])
def test_head_dims_out_of_range_are_refused_with_their_shape(head_dim: int) -> None:
    cache = torch.zeros(2, 4, BLOCK, 2, head_dim, device=DEVICE, dtype=HALF)
    with pytest.raises(ValueError, match=f"head_dim must be in \\[16, 256\\], got {head_dim}"):
        TritonAttentionBackend().warm_up(cache, 4, 4)
