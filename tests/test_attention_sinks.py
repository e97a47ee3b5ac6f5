"""Attention sinks (gpt-oss) in TorchAttentionBackend, against a float64 per-token reference: each
head's sink logit joins the softmax and its share of the probability goes to no value."""

from __future__ import annotations

import pytest
import torch

from batchlm.attention.backend import AttentionSpec
from batchlm.attention.torch_backend import TorchAttentionBackend
from test_attention_window import CHUNKS
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


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.sliding_window}")
@pytest.mark.parametrize("sinks", SINKS, ids=["spread", "even"])
def test_each_query_shares_its_softmax_with_its_heads_sink(spec: AttentionSpec, sinks: torch.Tensor) -> None:
    query, key, value, cache, meta, full_kv = _scenario(CHUNKS)
    out = TorchAttentionBackend().forward(query, key, value, cache, meta, spec, sinks)
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
