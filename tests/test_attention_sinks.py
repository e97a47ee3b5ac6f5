"""Attention sinks (gpt-oss) in TorchAttentionBackend, on its explicit-score path and through the CPU
decode kernel (kernels/cpu_decode_attention.py), against a float64 per-token reference: each head's
sink logit joins the softmax and its share of the probability goes to no value."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from batchlm.attention.backend import AttentionSpec
from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.kernels import cpu_decode_attention
from test_attention_window import CHUNKS
from test_cpu_decode_attention import _paged, needs_kernel
from test_torch_attention import HEADS, KV_HEADS, SCALE, _scenario


def reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: int,
    spec: AttentionSpec,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """One query [H, D] over the keys up to `position` (its window), the sinks beside them."""
    first = 0 if spec.sliding_window is None else max(0, position - spec.sliding_window + 1)
    group = HEADS // KV_HEADS
    k = keys[first : position + 1].double().repeat_interleave(group, dim=1)
    v = values[first : position + 1].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.double(), k) * spec.scale
    with_sinks = torch.cat([scores, sinks.double()[:, None]], dim=1)
    return torch.einsum("hl,lhd->hd", with_sinks.softmax(dim=-1)[:, :-1], v)


SPECS = [AttentionSpec(SCALE, sinks=True), AttentionSpec(SCALE, sliding_window=3, sinks=True)]
# From a sink far below the scores (little changes) to one far above them (the output near zero).
SINKS = [torch.linspace(-8.0, 8.0, HEADS), torch.full((HEADS,), 0.5)]


def _count_kernel_calls_with_sinks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of each call of the C decode kernel that passes sinks, recorded as the backend makes it."""
    calls: list[int] = []
    kernel: Callable[..., None] = cpu_decode_attention.paged_decode_attention

    def recording(query: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        sinks = kwargs.get("sinks", args[7] if len(args) > 7 else None)
        if sinks is not None:
            calls.append(query.shape[0])
        kernel(query, *args, **kwargs)

    monkeypatch.setattr(cpu_decode_attention, "paged_decode_attention", recording)
    return calls


@pytest.mark.parametrize("path", ["c-kernel", "torch"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.sliding_window}")
@pytest.mark.parametrize("sinks", SINKS, ids=["spread", "even"])
def test_each_query_shares_its_softmax_with_its_heads_sink(
    spec: AttentionSpec, sinks: torch.Tensor, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "torch":
        monkeypatch.setattr(cpu_decode_attention, "supports", lambda *_: False)
    elif cpu_decode_attention.decode_library() is None:
        pytest.skip("no AVX2 CPU or C compiler here")
    calls = _count_kernel_calls_with_sinks(monkeypatch)
    query, key, value, cache, meta, full_kv = _scenario(CHUNKS)
    out = TorchAttentionBackend().forward(query, key, value, cache, meta, spec, sinks)
    # The C kernel serves the decodes (2 rows) and the short chunk after cached context (6 rows) as
    # decodes; the fresh prompt stays on the explicit-score path.
    assert calls == ([2, 6] if path == "c-kernel" else [])
    row = 0
    for chunk, (k, v) in zip(CHUNKS, full_kv, strict=True):
        for i in range(len(chunk.tokens)):
            expected = reference(query[row], k, v, chunk.start + i, spec, sinks)
            torch.testing.assert_close(out[row].double(), expected, atol=1e-5, rtol=1e-5)
            row += 1


def test_a_high_sink_takes_the_attention_away() -> None:
    query, key, value, cache, meta, _ = _scenario(CHUNKS)
    spec = AttentionSpec(SCALE, sinks=True)
    low = TorchAttentionBackend().forward(
        query, key, value, cache.clone(), meta, spec, torch.full((HEADS,), -1e4)
    )
    plain = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, AttentionSpec(SCALE))
    torch.testing.assert_close(low, plain, atol=1e-6, rtol=1e-6)
    high = TorchAttentionBackend().forward(
        query, key, value, cache.clone(), meta, spec, torch.full((HEADS,), 1e4)
    )
    assert high.abs().max() < 1e-6


def test_the_sinks_go_exactly_where_the_spec_says() -> None:
    query, key, value, cache, meta, _ = _scenario(CHUNKS)
    backend = TorchAttentionBackend()
    with pytest.raises(ValueError, match="spec says True"):
        backend.forward(query, key, value, cache, meta, AttentionSpec(SCALE, sinks=True))
    with pytest.raises(ValueError, match="spec says False"):
        backend.forward(query, key, value, cache, meta, AttentionSpec(SCALE), torch.zeros(HEADS))
    with pytest.raises(ValueError, match="query heads"):
        backend.forward(
            query, key, value, cache, meta, AttentionSpec(SCALE, sinks=True), torch.zeros(HEADS + 1)
        )


def _kernel_reference(
    query: torch.Tensor,
    cache: torch.Tensor,
    tables: torch.Tensor,
    lengths: list[int],
    scale: float,
    window: int | None,
    sinks: torch.Tensor,
    sink_copies: int = 1,
) -> torch.Tensor:
    """Each row's query over the last `window` (or all) of its cached tokens in float64, with
    `sink_copies` of each head's sink in its softmax (1: what a kernel must compute)."""
    heads, kv_heads = query.shape[1], cache.shape[3]
    out = []
    for row, length in enumerate(lengths):
        blocks = tables[row, : -(-length // cache.shape[2])].long()
        first = max(0, length - window) if window else 0
        keys, values = (
            cache[i, blocks].flatten(0, 1)[first:length].double().repeat_interleave(heads // kv_heads, dim=1)
            for i in (0, 1)
        )
        scores = torch.einsum("hd,lhd->hl", query[row].double(), keys) * scale
        with_sinks = torch.cat([scores, sinks.double()[:, None].expand(-1, sink_copies)], dim=1)
        weights = with_sinks.softmax(dim=-1)[:, : keys.shape[0]]
        out.append(torch.einsum("hl,lhd->hd", weights, values))
    return torch.stack(out)


@needs_kernel
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 8), (8, 2, 64), (9, 3, 16)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_the_c_kernel_folds_each_heads_sink_in_once(
    window: int | None, heads: int, kv_heads: int, head_dim: int, cache_dtype: torch.dtype
) -> None:
    lengths = [1, 7, 16, 17, 70]  # one token, a window's edge mid-block, a context past the window
    cache, tables = _paged(lengths, 4, kv_heads, head_dim, seed=5, dtype=cache_dtype)
    query = torch.randn(len(lengths), heads, head_dim, generator=torch.Generator().manual_seed(6))
    scale = 1 / math.sqrt(head_dim)
    # Sinks beside the scores (where a missing or doubled sink shows most) and far from them.
    sinks = torch.linspace(-1.0, 2.0, heads)
    sinks[0], sinks[-1] = -30.0, 30.0
    out = torch.full_like(query, float("nan"))
    cpu_decode_attention.paged_decode_attention(
        query, cache, tables, torch.tensor(lengths, dtype=torch.int32), scale, out, window=window, sinks=sinks
    )
    reference = _kernel_reference(query, cache, tables, lengths, scale, window, sinks)
    torch.testing.assert_close(out.double(), reference, atol=2e-5, rtol=1e-4)
    # The case tells a sink left out, or counted twice, from one counted once.
    for copies in (0, 2):
        wrong = _kernel_reference(query, cache, tables, lengths, scale, window, sinks, copies)
        assert (wrong - reference).abs().max() > 1e-2


@needs_kernel
def test_the_c_kernel_takes_sinks_in_the_models_dtype_and_keeps_a_padding_row_zero() -> None:
    cache, tables = _paged([9, 4], 4, 2, 16, seed=7)
    query = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(8))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.bfloat16)
    out = torch.full_like(query, float("nan"))
    lengths = torch.tensor([9, 0], dtype=torch.int32)
    cpu_decode_attention.paged_decode_attention(query, cache, tables, lengths, 0.25, out, sinks=sinks)
    expected = _kernel_reference(query[:1], cache, tables, [9], 0.25, None, sinks.float())
    torch.testing.assert_close(out[:1].double(), expected, atol=2e-5, rtol=1e-4)
    assert torch.count_nonzero(out[1]) == 0
