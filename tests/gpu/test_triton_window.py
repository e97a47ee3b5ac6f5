"""Sliding windows and soft-caps in the Triton attention kernels, against TorchAttentionBackend (which
tests/test_attention_window.py pins to a float64 reference).

GPU only (marked `gpu`); TRITON_INTERPRET=1 runs it on the CPU through Triton's interpreter (fp16).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from devices import DEVICE, HALF, HALF_ATOL, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from batchlm.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from batchlm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from batchlm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from batchlm.kernels.paged_decode import paged_decode_attention  # noqa: E402
from models_harness import Chunk, build_step  # noqa: E402

BLOCK, KV_HEADS, HEADS, HEAD_DIM = 16, 2, 8, 64
SPECS = [
    AttentionSpec(0.125, sliding_window=20),
    AttentionSpec(0.125, sliding_window=1),
    AttentionSpec(0.5, logit_softcap=3.0),
    AttentionSpec(0.5, sliding_window=37, logit_softcap=3.0),
]
# Decodes over contexts longer and shorter than the windows, a fresh prompt, a chunk after a cached
# context: every window start lands somewhere inside a block and inside a key tile.
CHUNKS = [
    Chunk([1], 150, list(range(0, 10))),
    Chunk([1], 9, [10]),
    Chunk(list(range(70)), 0, list(range(11, 16))),
    Chunk(list(range(45)), 83, list(range(16, 24))),
]


def scenario(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, 24, BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    tokens = sum(len(c.tokens) for c in CHUNKS)
    q = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    return cache, q, k, v


def on_device(meta: AttentionMetadata) -> AttentionMetadata:
    moved = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        moved[name] = moved[name].to(DEVICE)
    return AttentionMetadata(**moved)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.sliding_window}-cap{s.logit_softcap}")
def test_triton_backend_matches_torch(spec: AttentionSpec) -> None:
    cache, q, k, v = scenario()
    _, _, meta = build_step(CHUNKS, BLOCK)
    half = [t.to(HALF) for t in (cache, q, k, v)]
    expected = TorchAttentionBackend().forward(*(t.float() for t in half[1:]), half[0].float(), meta, spec)
    dev = [t.to(DEVICE) for t in half]
    out = TritonAttentionBackend().forward(dev[1], dev[2], dev[3], dev[0], on_device(meta), spec)
    torch.testing.assert_close(out.float().cpu(), expected, atol=HALF_ATOL, rtol=0)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("spec", SPECS[:2] + SPECS[3:], ids=lambda s: f"w{s.sliding_window}")
def test_split_decode_covers_only_the_window(spec: AttentionSpec, splits: int) -> None:
    cache, q, k, v = scenario(1)
    decodes = CHUNKS[:2]
    _, _, meta = build_step(decodes, BLOCK)
    half = [t.to(HALF) for t in (cache, q[:2], k[:2], v[:2])]
    expected = TorchAttentionBackend().forward(*(t.float() for t in half[1:]), half[0].float(), meta, spec)
    dev_meta = on_device(meta)
    dev_cache = half[0].to(DEVICE)
    TritonAttentionBackend().forward(*(t.to(DEVICE) for t in half[1:]), dev_cache, dev_meta, spec)  # KV write
    out = paged_decode_attention(
        half[1].to(DEVICE), dev_cache, dev_meta.seq_lens, dev_meta.block_tables, spec.scale,
        num_splits=splits, window=spec.sliding_window, softcap=spec.logit_softcap,
    )  # fmt: skip
    torch.testing.assert_close(out.float().cpu(), expected, atol=HALF_ATOL, rtol=0)


def test_warm_up_launches_each_variant_the_layers_use() -> None:
    cache = torch.zeros(2, 4, BLOCK, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=HALF)
    launched: list[tuple[int | None, float | None]] = []
    backend = TritonAttentionBackend()
    original = backend._warm_up_variant

    def record(
        kv_cache: torch.Tensor, heads: int, blocks: int, spec: AttentionSpec, query_dtype: torch.dtype | None
    ) -> None:
        launched.append((spec.sliding_window, spec.logit_softcap))
        original(kv_cache, heads, blocks, spec, query_dtype)

    backend._warm_up_variant = record  # type: ignore[method-assign]
    gemma2 = [AttentionSpec(0.1, 8, 50.0), AttentionSpec(0.1, None, 50.0)] * 2
    backend.warm_up(cache, HEADS, 4, gemma2)
    assert launched == [(8, 50.0), (None, 50.0)]
