"""Sliding windows and logit soft-caps in TorchAttentionBackend, against a float64 per-token reference."""

from __future__ import annotations

import pytest
import torch

from batchlm.attention.backend import AttentionSpec
from batchlm.attention.torch_backend import TorchAttentionBackend
from models_harness import Chunk
from test_torch_attention import HEADS, KV_HEADS, SCALE, _scenario


def reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int, spec: AttentionSpec
) -> torch.Tensor:
    """One query [H, D] over the keys its spec lets it see, up to `position`, in float64."""
    first = 0 if spec.sliding_window is None else max(0, position - spec.sliding_window + 1)
    group = HEADS // KV_HEADS
    k = keys[first : position + 1].double().repeat_interleave(group, dim=1)
    v = values[first : position + 1].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.double(), k) * spec.scale
    if spec.logit_softcap is not None:
        scores = torch.tanh(scores / spec.logit_softcap) * spec.logit_softcap
    return torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), v)


SPECS = [
    AttentionSpec(SCALE, sliding_window=3),
    AttentionSpec(SCALE, sliding_window=5),
    AttentionSpec(SCALE * 4, logit_softcap=2.0),
    AttentionSpec(SCALE * 4, sliding_window=4, logit_softcap=2.0),
]
# Decodes first (windows ending mid-block, a context shorter than the window), then a fresh prompt
# and a chunk continuing 9 cached tokens.
CHUNKS = [
    Chunk([1], 12, [3, 4, 5, 6]),
    Chunk([1], 2, [7]),
    Chunk(list(range(10)), 0, [8, 9, 10]),
    Chunk(list(range(6)), 9, [11, 12, 13, 14]),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.sliding_window}-cap{s.logit_softcap}")
@pytest.mark.parametrize("use_c_kernel", [True, False], ids=["default", "torch-decode"])
def test_each_query_sees_only_its_window(spec: AttentionSpec, use_c_kernel: bool, monkeypatch) -> None:
    if not use_c_kernel:
        monkeypatch.setattr("batchlm.kernels.cpu_decode_attention.supports", lambda *_: False)
    query, key, value, cache, meta, full_kv = _scenario(CHUNKS)
    out = TorchAttentionBackend().forward(query, key, value, cache, meta, spec)
    row = 0
    for chunk, (k, v) in zip(CHUNKS, full_kv, strict=True):
        for i in range(len(chunk.tokens)):
            expected = reference(query[row], k, v, chunk.start + i, spec)
            torch.testing.assert_close(out[row].double(), expected, atol=1e-5, rtol=1e-5)
            row += 1


def test_a_window_changes_the_result_once_the_context_outgrows_it() -> None:
    query, key, value, cache, meta, _ = _scenario(CHUNKS)
    full = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, AttentionSpec(SCALE))
    wide = AttentionSpec(SCALE, sliding_window=64)
    same = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, wide)
    torch.testing.assert_close(same, full, atol=1e-6, rtol=1e-6)
    narrow = AttentionSpec(SCALE, sliding_window=2)
    windowed = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, narrow)
    assert not torch.allclose(windowed[0], full[0], atol=1e-3)


def test_soft_capped_prefill_in_query_slices_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = AttentionSpec(SCALE * 4, sliding_window=4, logit_softcap=2.0)
    query, key, value, cache, meta, _ = _scenario(CHUNKS)
    whole = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, spec)
    # Room for 3 query rows of one chunk's scores at a time.
    monkeypatch.setattr("batchlm.attention.torch_backend.SOFTCAP_SCORE_ELEMENTS", 3 * HEADS * 15)
    sliced = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, spec)
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=1e-6)
