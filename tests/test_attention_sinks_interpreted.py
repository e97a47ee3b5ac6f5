"""Attention sinks in the Triton attention kernels, run on the CPU through Triton's interpreter: the
split-KV decode with one split (the sink folded in after the tiles) and several (folded into the
merge), and the prefill over cached context and within a window, against a float64 reference; then
TritonAttentionBackend against TorchAttentionBackend on a step of decodes and prefill chunks.
tests/gpu/test_triton_sinks.py runs the same on a GPU, with CUDA graphs and an FP8 cache."""

from __future__ import annotations

from interpreter_harness import run_interpreted

PATCH_INTERPRETER = """
# Triton 3.6's interpreter turns a loop bound into an index with int(array), which NumPy 2.4
# refuses for a one-element array; tests/gpu/conftest.py patches it the same way.
from triton.runtime import interpreter

patch_tensor = interpreter._patch_lang_tensor


def patched(tensor, scope):
    patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = patched
"""

KERNELS_CHECK = (
    PATCH_INTERPRETER
    + """
import math

import torch

from batchlm.kernels.paged_decode import paged_decode_attention
from batchlm.kernels.paged_prefill import paged_prefill_attention

BLOCK, HEADS, KV_HEADS, HEAD_DIM = 16, 6, 2, 16
SCALE = HEAD_DIM**-0.5
generator = torch.Generator().manual_seed(0)
# Sinks beside the scores (where a missing or doubled sink shows most) and far above and below them.
SINKS = torch.tensor([-1.0, 0.0, 0.5, 1.5, -30.0, 30.0])


def paged(seq_lens, rows):
    needed = [math.ceil(s / BLOCK) for s in seq_lens]
    cache = torch.randn(2, sum(needed), BLOCK, KV_HEADS, HEAD_DIM, generator=generator)
    perm = torch.randperm(sum(needed), generator=generator)
    tables = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    used = 0
    for row, count in enumerate(needed):
        tables[row, :count] = perm[used : used + count].int()
        used += count
    return cache, tables, torch.randn(rows, HEADS, HEAD_DIM, generator=generator)


def reference(query, cache, table, position, window, copies=1):
    # One query [H, D] at `position` over the keys its window lets it see, `copies` sinks a head.
    first = 0 if window is None else max(0, position - window + 1)
    blocks = table[: position // BLOCK + 1].long()
    keys, values = (
        cache[i, blocks].flatten(0, 1)[first : position + 1].double().repeat_interleave(HEADS // KV_HEADS, 1)
        for i in (0, 1)
    )
    scores = torch.einsum("hd,lhd->hl", query.double(), keys) * SCALE
    weights = torch.cat([scores, SINKS.double()[:, None].expand(-1, copies)], 1).softmax(-1)
    return torch.einsum("hl,lhd->hd", weights[:, : keys.shape[0]], values)


def check(name, out, expected, wrong):
    error = (out.double() - expected).abs().max().item()
    assert error < 1e-4, (name, error)
    for copies, other in wrong.items():  # the case tells a sink left out or doubled from one counted once
        assert (other - expected).abs().max().item() > 1e-2, (name, copies)


# Decode: a padding row (length 0), a short context, and contexts that 4 splits of 64 tokens share.
seq_lens = [0, 5, 70, 200]
cache, tables, query = paged(seq_lens, len(seq_lens))
lens = torch.tensor(seq_lens, dtype=torch.int32)
for window in (None, 100):
    live = range(1, len(seq_lens))
    expected = torch.stack([reference(query[r], cache, tables[r], seq_lens[r] - 1, window) for r in live])
    wrong = {
        c: torch.stack([reference(query[r], cache, tables[r], seq_lens[r] - 1, window, c) for r in live])
        for c in (0, 2)
    }
    for splits in (1, 4):
        out = torch.full_like(query, float("nan"))
        paged_decode_attention(
            query, cache, lens, tables, SCALE, out=out, num_splits=splits, window=window, sinks=SINKS
        )
        check(("decode", splits, window), out[1:], expected, wrong)
        assert torch.count_nonzero(out[0]) == 0, ("padding row", splits, window)

# Prefill: a fresh prompt of 20 tokens and a chunk of 30 after 15 cached tokens, whole and windowed.
seq_lens, starts = [20, 45], [0, 20, 50]
cache, tables, query = paged(seq_lens, starts[-1])
rows = [(req, seq_lens[req] - (starts[req + 1] - starts[req]) + i) for req in (0, 1)
        for i in range(starts[req + 1] - starts[req])]  # fmt: skip
for window in (None, 7):
    expected = torch.stack([reference(query[r], cache, tables[q], p, window) for r, (q, p) in enumerate(rows)])
    wrong = {
        c: torch.stack([reference(query[r], cache, tables[q], p, window, c) for r, (q, p) in enumerate(rows)])
        for c in (0, 2)
    }
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(
        query, cache, torch.tensor(starts, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
        tables, SCALE, 30, out=out, window=window, sinks=SINKS,
    )  # fmt: skip
    check(("prefill", window), out, expected, wrong)
print("sink kernels ok")
"""
)

BACKEND_CHECK = (
    PATCH_INTERPRETER
    + """
import torch

from batchlm.attention.backend import AttentionSpec
from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.attention.triton_backend import TritonAttentionBackend
import test_torch_attention
from test_attention_window import CHUNKS
from test_torch_attention import HEADS, SCALE, _scenario

test_torch_attention.HEAD_DIM = 16  # the Triton kernels' smallest head (the torch tests use 8)
sinks = torch.linspace(-2.0, 3.0, HEADS)
for spec in (AttentionSpec(SCALE, sinks=True), AttentionSpec(SCALE, sliding_window=3, sinks=True)):
    query, key, value, cache, meta, _ = _scenario(CHUNKS)
    expected = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, spec, sinks)
    out = TritonAttentionBackend().forward(query.clone(), key, value, cache.clone(), meta, spec, sinks)
    error = (out - expected).abs().max().item()
    assert error < 1e-4, (spec, error)
    plain = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, AttentionSpec(SCALE, spec.sliding_window))
    assert (plain - expected).abs().max().item() > 1e-2, "the sinks change the outputs"
print("sink backend ok")
"""
)


def test_the_kernels_fold_each_heads_sink_in_once() -> None:
    run_interpreted(KERNELS_CHECK, "sink kernels ok")


def test_the_triton_backend_takes_sinks_as_the_torch_backend_does() -> None:
    run_interpreted(BACKEND_CHECK, "sink backend ok")
