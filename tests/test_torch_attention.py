"""TorchAttentionBackend against a naive per-token reference over the paged KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from batchlm.attention.backend import AttentionSpec
from batchlm.attention.torch_backend import TorchAttentionBackend, gather_context, write_kv_cache
from batchlm.kernels import cpu_decode_attention
from models_harness import Chunk, build_step

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4
SCALE = 1 / math.sqrt(HEAD_DIM)


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int) -> torch.Tensor:
    """One query [H, D] over keys/values [L, H_kv, D] at positions <= position, in float64."""
    group = HEADS // KV_HEADS
    k = keys[: position + 1].double().repeat_interleave(group, dim=1)  # [p + 1, H, D]
    v = values[: position + 1].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.double(), k) * SCALE
    return torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), v)


def _scenario(chunks: list[Chunk], num_blocks: int = 24, seed: int = 0):
    """Random Q/K/V for `chunks`, with the context before each chunk already in a random cache.

    Returns the backend's output and, per request, all of its keys/values (cached + new)."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    full_kv = []
    for chunk in chunks:
        total = chunk.start + len(chunk.tokens)
        k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen)
        slots = torch.tensor(
            [chunk.blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(chunk.start)], dtype=torch.long
        )
        write_kv_cache(cache, k[: chunk.start], v[: chunk.start], slots)
        full_kv.append((k, v))
    _, _, meta = build_step(chunks, BLOCK)
    num_tokens = meta.num_tokens
    query = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=gen)
    key = torch.cat([k[c.start :] for c, (k, _) in zip(chunks, full_kv, strict=True)])
    value = torch.cat([v[c.start :] for c, (_, v) in zip(chunks, full_kv, strict=True)])
    return query, key, value, cache, meta, full_kv


def _check(chunks: list[Chunk], backend: TorchAttentionBackend | None = None) -> None:
    query, key, value, cache, meta, full_kv = _scenario(chunks)
    out = (backend or TorchAttentionBackend()).forward(query, key, value, cache, meta, AttentionSpec(SCALE))
    row = 0
    for chunk, (k, v) in zip(chunks, full_kv, strict=True):
        for i in range(len(chunk.tokens)):
            expected = _reference(query[row], k, v, chunk.start + i)
            torch.testing.assert_close(out[row].double(), expected, atol=1e-5, rtol=1e-5)
            row += 1


def test_prefill_without_cache_is_causal() -> None:
    _check([Chunk([0] * 10, 0, [3, 1, 7])])


def test_prefill_chunk_over_cached_context() -> None:
    # Second chunk of a chunked prefill: 6 cached tokens, 5 new ones.
    _check([Chunk([0] * 5, 6, [8, 2, 5])])


def test_mixed_decodes_and_prefills() -> None:
    chunks = [
        Chunk([0], 9, [4, 11, 6]),  # decode at position 9 (context 10)
        Chunk([0], 2, [0]),  # decode with a single block
        Chunk([0], 12, [13, 14, 15, 16]),  # decode at the end of a full block
        Chunk([0] * 7, 0, [1, 17]),  # fresh prefill
        Chunk([0] * 3, 5, [18, 19]),  # chunked prefill
        Chunk([0], 4, [20, 21]),  # last prefill chunk of length one (not a decode: after the prefills)
    ]
    _check(chunks)


@pytest.mark.parametrize("group_size", [1, 2, 64])
def test_decode_grouping_does_not_change_results(group_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Grouping is torch's decode path; the C kernel (where present) reads the cache without groups.
    monkeypatch.setattr(cpu_decode_attention, "supports", lambda query, kv_cache: False)
    chunks = [Chunk([0], start, [i * 3, i * 3 + 1, i * 3 + 2]) for i, start in enumerate([1, 11, 5, 8, 3])]
    _check(chunks, TorchAttentionBackend(decode_group_size=group_size))


def test_new_keys_and_values_are_written_at_their_slots() -> None:
    chunks = [Chunk([0], 5, [2, 6]), Chunk([0] * 3, 0, [9])]
    query, key, value, cache, meta, _ = _scenario(chunks)
    TorchAttentionBackend().forward(query, key, value, cache, meta, AttentionSpec(SCALE))
    for token, slot in enumerate(meta.slot_mapping.tolist()):
        block, offset = divmod(slot, BLOCK)
        torch.testing.assert_close(cache[0, block, offset], key[token], rtol=0, atol=0)
        torch.testing.assert_close(cache[1, block, offset], value[token], rtol=0, atol=0)


def test_padding_rows_are_ignored_and_zero() -> None:
    chunks = [Chunk([0], 3, [1]), Chunk([0] * 2, 0, [2])]
    query, key, value, cache, meta, _ = _scenario(chunks)
    pad = 3
    padded = [torch.cat([t, torch.full((pad, *t.shape[1:]), 7.0)]) for t in (query, key, value)]
    untouched = cache.clone()
    reference = TorchAttentionBackend().forward(query, key, value, cache, meta, AttentionSpec(SCALE))
    out = TorchAttentionBackend().forward(*padded, untouched, meta, AttentionSpec(SCALE))
    torch.testing.assert_close(out[: meta.num_tokens], reference)
    assert torch.count_nonzero(out[meta.num_tokens :]) == 0


def test_gather_context_follows_the_block_table() -> None:
    cache = torch.arange(6 * BLOCK, dtype=torch.float32).view(6, BLOCK, 1, 1)
    table = torch.tensor([4, 1, 3], dtype=torch.int32)
    gathered = gather_context(cache, table, 10).flatten().tolist()
    assert gathered == [16, 17, 18, 19, 4, 5, 6, 7, 12, 13]


def test_bfloat16_matches_float32_loosely() -> None:
    chunks = [Chunk([0], 6, [0, 1]), Chunk([0] * 6, 0, [2, 3])]
    query, key, value, cache, meta, _ = _scenario(chunks)
    expected = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, AttentionSpec(SCALE))
    bf16 = [t.bfloat16() for t in (query, key, value, cache)]
    out = TorchAttentionBackend().forward(*bf16[:3], bf16[3], meta, AttentionSpec(SCALE))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_a_steps_chunk_masks_are_built_once_for_all_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two chunks after cached context, attended by three layers (calls with one metadata object):
    # each distinct mask is built once, the results are those of masks built afresh, and the next
    # step's metadata builds them again.
    from batchlm.attention import torch_backend

    built: list[tuple[int, int]] = []
    original = torch_backend._chunk_mask

    def counting(query_len: int, context_len: int, window: int | None, device: torch.device) -> torch.Tensor:
        built.append((query_len, context_len))
        return original(query_len, context_len, window, device)

    monkeypatch.setattr(torch_backend, "_chunk_mask", counting)
    # Longer than the chunks that attend as decode rows (MAX_CHUNK_AS_DECODES).
    chunks = [Chunk([1] * 20, 6, list(range(7))), Chunk([2] * 20, 6, list(range(7, 14)))]
    query, key, value, cache, meta, _ = _scenario(chunks)
    backend = TorchAttentionBackend()
    outs = [backend.forward(query, key, value, cache, meta, AttentionSpec(SCALE)) for _ in range(3)]
    assert built == [(20, 26)]  # both requests' chunks have the same shape: one mask
    fresh = TorchAttentionBackend().forward(query, key, value, cache, meta, AttentionSpec(SCALE))
    assert all(torch.equal(out, fresh) for out in outs)
    _check(chunks, backend)  # a new step (new metadata): built again, and right
    assert built == [(20, 26)] * 3
