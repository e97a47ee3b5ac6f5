"""TritonAttentionBackend end to end: KV write, then decode + prefill dispatch, against dense attention.

GPU only (marked `gpu`); TRITON_INTERPRET=1 runs it on the CPU through Triton's interpreter (fp16).
"""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, HALF, HALF_ATOL, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from batchlm.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from batchlm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from batchlm.kernels.reference import causal_attention_reference, write_kv_cache_reference  # noqa: E402

BLOCK_SIZE, NUM_KV_HEADS, NUM_HEADS, HEAD_DIM = 16, 2, 8, 64
PADDING_ROWS = 2  # CUDA-graph style padding at the end of the batch (slot -1)


def slots_of(table: list[int], positions: range) -> list[int]:
    return [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]


def build_step(contexts: list[int], chunks: list[int], num_decodes: int):
    """Dense per-request K/V, a cache holding each request's cached part, and this step's inputs."""
    seq_lens = [c + n for c, n in zip(contexts, chunks, strict=True)]
    blocks_per_req = [-(-s // BLOCK_SIZE) for s in seq_lens]
    perm = torch.randperm(sum(blocks_per_req) + 8).tolist()
    tables, used = [], 0
    for count in blocks_per_req:
        tables.append(perm[used : used + count])
        used += count
    width = max(blocks_per_req) + 2
    cache = torch.randn(2, len(perm), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    dense = [torch.randn(2, s, NUM_KV_HEADS, HEAD_DIM, device=DEVICE).to(HALF) for s in seq_lens]
    new_k, new_v, slots = [], [], []
    for table, kv, ctx, n in zip(tables, dense, contexts, chunks, strict=True):
        cached = torch.tensor(slots_of(table, range(ctx)), dtype=torch.int64, device=DEVICE)
        write_kv_cache_reference(kv[0, :ctx], kv[1, :ctx], cache, cached)
        new_k.append(kv[0, ctx : ctx + n])
        new_v.append(kv[1, ctx : ctx + n])
        slots += slots_of(table, range(ctx, ctx + n))
    pad = torch.zeros(PADDING_ROWS, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=HALF)
    key, value = torch.cat([*new_k, pad]), torch.cat([*new_v, pad])
    starts = [0]
    for n in chunks:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots + [-1] * PADDING_ROWS, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE
        ),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        max_query_len=max(chunks),
        max_seq_len=max(seq_lens),
        num_decodes=num_decodes,
    )
    return cache, dense, key, value, meta


@pytest.mark.parametrize(("with_decodes", "with_prefills"), [(True, True), (True, False), (False, True)])
def test_mixed_batch_matches_dense_attention(with_decodes: bool, with_prefills: bool) -> None:
    torch.manual_seed(0)
    decode_ctx = [4, 99, 1023, 16] if with_decodes else []
    prefill_ctx, prefill_chunks = ([0, 32, 17, 200], [50, 20, 3, 1]) if with_prefills else ([], [])
    contexts, chunks = decode_ctx + prefill_ctx, [1] * len(decode_ctx) + prefill_chunks
    cache, dense, key, value, meta = build_step(contexts, chunks, len(decode_ctx))
    query = torch.randn(key.shape[0], NUM_HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    before = cache.clone()
    out = TritonAttentionBackend().forward(query, key, value, cache, meta, AttentionSpec(HEAD_DIM**-0.5))
    starts = meta.query_start_loc_cpu
    for req, kv in enumerate(dense):
        rows = slice(starts[req], starts[req + 1])
        ref = causal_attention_reference(query[rows], kv[0], kv[1], HEAD_DIM**-0.5)
        torch.testing.assert_close(out[rows].float(), ref, atol=HALF_ATOL, rtol=0.0)
    assert torch.equal(out[starts[-1] :], torch.zeros_like(out[starts[-1] :]))
    # The new tokens landed at their slots; every other slot kept its contents.
    flat, flat_before = cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM), before.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
    written = meta.slot_mapping[: starts[-1]]
    assert torch.equal(flat[0, written], key[: starts[-1]]) and torch.equal(
        flat[1, written], value[: starts[-1]]
    )
    untouched = torch.ones(flat.shape[1], dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert torch.equal(flat[:, untouched], flat_before[:, untouched])


def test_padding_decode_row_gives_zeros() -> None:
    torch.manual_seed(1)
    cache, _, key, value, meta = build_step([10, 0], [1, 1], num_decodes=2)
    # Turn the second decode into a CUDA-graph padding row: no context, no slot.
    meta.seq_lens[1] = 0
    meta.seq_lens_cpu[1] = 0
    meta.slot_mapping[1] = -1
    query = torch.randn(key.shape[0], NUM_HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    out = TritonAttentionBackend().forward(query, key, value, cache, meta, AttentionSpec(0.125))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0


def test_rejects_unsupported_inputs() -> None:
    cache, _, key, value, meta = build_step([3], [2], num_decodes=0)
    query = torch.randn(key.shape[0], NUM_HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    backend = TritonAttentionBackend()
    with pytest.raises(ValueError, match="value must be"):
        backend.forward(query, key, value.float(), cache, meta, AttentionSpec(0.125))
    with pytest.raises(ValueError, match="num_kv_heads"):
        backend.forward(query[:, :3], key, value, cache, meta, AttentionSpec(0.125))
    # A head dim that is not a power of two is padded inside the kernels; one past 256 is refused.
    wide = torch.zeros(2, 4, BLOCK_SIZE, NUM_KV_HEADS, 512, device=DEVICE, dtype=HALF)
    with pytest.raises(ValueError, match=r"head_dim must be in \[16, 256\], got 512"):
        backend.forward(query, key, value, wide, meta, AttentionSpec(0.125))
