"""The FP8 (e4m3) KV cache through the Triton backend: the KV write stores value / scale clamped to
e4m3's range, and decode and prefill attention over it match the float32 reference computed from the
dequantized cache (e4m3 values are exact in fp16/bf16, so only the usual kernel tolerance applies).
Against a 16-bit cache the outputs differ by the cache's rounding: 3 mantissa bits, up to 1/16 of each
key and value; on N(0, 1) inputs that moved outputs by at most ~0.06 here, the test allows 0.15.

GPU only (marked `gpu`); TRITON_INTERPRET=1 runs the fp16 cases on the CPU. Triton 3.6's interpreter
converts float32 -> e4m3 wrongly (7.8 became 4.0, -1.97 became -1.0: it drops to the power of two
below), so there the write test checks only the layout, clamping and padding (values within a factor
of two) and the comparison with a 16-bit cache is skipped; on a GPU the values must equal torch's
round-to-nearest exactly.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from devices import DEVICE, HALF, INTERPRET, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from batchlm.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from batchlm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from batchlm.kernels.kv_write import write_kv_cache  # noqa: E402
from batchlm.kernels.reference import paged_attention_reference  # noqa: E402

FP8 = torch.float8_e4m3fn
KV_HEADS, HEADS, HEAD_DIM, BLOCK = 2, 8, 64, 16


def metadata(contexts: list[int], chunks: list[int], num_decodes: int, max_blocks: int) -> AttentionMetadata:
    """Request i holds contexts[i] cached tokens and gets chunks[i] new ones, in blocks i * max_blocks..."""
    starts, slots = [0], []
    for req, (ctx, new) in enumerate(zip(contexts, chunks, strict=True)):
        starts.append(starts[-1] + new)
        slots += [req * max_blocks * BLOCK + pos for pos in range(ctx, ctx + new)]
    seq_lens = [c + n for c, n in zip(contexts, chunks, strict=True)]
    tables = torch.arange(len(chunks) * max_blocks, dtype=torch.int32).reshape(len(chunks), max_blocks)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        max_query_len=max(chunks),
        max_seq_len=max(seq_lens),
        num_decodes=num_decodes,
    )


def filled_caches(num_blocks: int, k_scale: float, v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16-bit cache of random keys/values and the FP8 cache the KV write makes of the same values."""
    values = torch.randn(2, num_blocks * BLOCK, KV_HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    wide = values.view(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM).clone()
    narrow = torch.zeros_like(wide, dtype=FP8)
    slots = torch.arange(num_blocks * BLOCK, device=DEVICE)
    write_kv_cache(values[0], values[1], narrow, slots, k_scale, v_scale)
    return wide, narrow


def dequantized(cache: torch.Tensor, k_scale: float, v_scale: float) -> torch.Tensor:
    out = cache.float()
    out[0] *= k_scale
    out[1] *= v_scale
    return out


@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.25, 2.0)])
def test_fp8_write_scales_rounds_and_clamps(k_scale: float, v_scale: float) -> None:
    torch.manual_seed(0)
    key = torch.randn(40, KV_HEADS, HEAD_DIM, device=DEVICE).to(HALF) * 4
    value = torch.randn(40, KV_HEADS, HEAD_DIM, device=DEVICE).to(HALF) * 4
    key[0, 0, 0] = 1000.0 * k_scale  # past e4m3's 448: clamped, never NaN
    cache = torch.zeros(2, 4, BLOCK, KV_HEADS, HEAD_DIM, dtype=FP8, device=DEVICE)
    slots = torch.arange(64, device=DEVICE)[:40].clone()
    slots[5] = -1
    write_kv_cache(key, value, cache, slots, k_scale, v_scale)
    flat = cache.view(2, -1, KV_HEADS, HEAD_DIM).float()
    keep = slots >= 0
    for which, tensor, scale in ((0, key, k_scale), (1, value, v_scale)):
        expected = (tensor.float() / scale).clamp(-448, 448).to(FP8).float()[keep]
        got = flat[which, slots[keep]]
        assert not got.isnan().any()
        if INTERPRET:
            assert bool(((got - expected).abs() <= expected.abs() / 2 + 2**-9).all())
        else:
            assert torch.equal(got, expected)
    assert float(flat[0, 0, 0, 0]) == 448.0
    assert bool((flat[:, 5] == 0).all())  # the padding slot's row stayed untouched


@pytest.mark.skipif(
    INTERPRET, reason="the attention kernels' loops fail in Triton 3.6's interpreter with NumPy 2.4"
)
@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.5, 0.25)])
def test_fp8_cache_attention_matches_reference_and_16_bit_cache(k_scale: float, v_scale: float) -> None:
    torch.manual_seed(1)
    contexts, chunks, num_decodes, max_blocks = [5, 300, 17, 0, 64], [1, 1, 40, 70, 1], 2, 24
    # Decodes first: the 5th request (one new token) counts as a prefill chunk of length 1 here.
    meta = metadata(contexts, chunks, num_decodes, max_blocks)
    wide, narrow = filled_caches(len(chunks) * max_blocks, k_scale, v_scale)
    total = sum(chunks)
    query = torch.randn(total, HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    key = torch.randn(total, KV_HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    value = torch.randn(total, KV_HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    backend = TritonAttentionBackend()
    backend.set_kv_scales([narrow], [(k_scale, v_scale)])
    scale = HEAD_DIM**-0.5
    out = backend.forward(query, key, value, narrow, meta, AttentionSpec(scale))
    ref = paged_attention_reference(
        query, dequantized(narrow, k_scale, v_scale), meta.query_start_loc_cpu, meta.seq_lens_cpu,
        meta.block_tables, scale,
    )  # fmt: skip
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0.0)
    if not INTERPRET:
        wide_out = TritonAttentionBackend().forward(query, key, value, wide, meta, AttentionSpec(scale))
        assert float((out.float() - wide_out.float()).abs().max()) <= 0.15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fp8_cache_decode_replays_in_cuda_graph() -> None:
    torch.manual_seed(2)
    batch, max_blocks, k_scale, v_scale = 8, 32, 0.5, 2.0
    _, narrow = filled_caches(batch * max_blocks, k_scale, v_scale)
    backend = TritonAttentionBackend()
    backend.set_kv_scales([narrow], [(k_scale, v_scale)])
    meta = metadata([1] * batch, [1] * batch, batch, max_blocks)
    query = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    key = torch.randn(batch, KV_HEADS, HEAD_DIM, device=DEVICE).to(HALF)
    value = torch.randn_like(key)
    backend.forward(query, key, value, narrow, meta, AttentionSpec(0.125))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(query, key, value, narrow, meta, AttentionSpec(0.125))
    for contexts in ([3, 100, 511, 7, 64, 200, 1, 40], [500] * batch):
        lengths = [c + 1 for c in contexts]
        meta.seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        meta.slot_mapping.copy_(torch.tensor([r * max_blocks * BLOCK + c for r, c in enumerate(contexts)]))
        query.copy_(torch.randn_like(query))
        key.copy_(torch.randn_like(key))
        graph.replay()
        ref = paged_attention_reference(
            query,
            dequantized(narrow, k_scale, v_scale),
            list(range(batch + 1)),
            lengths,
            meta.block_tables,
            0.125,
        )
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0.0)


@pytest.mark.skipif(
    INTERPRET, reason="the attention kernels' loops fail in Triton 3.6's interpreter with NumPy 2.4"
)
@pytest.mark.parametrize("in_registers", [False, True])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("query_magnitude", [1.0, 1e5])
def test_fp8_cache_decode_takes_queries_past_fp16_range(
    query_magnitude: float, num_splits: int, in_registers: bool
) -> None:
    """Decode over an FP8 cache multiplies in fp16: queries beyond fp16's largest value (65504) are
    scaled into range first, so they give the reference's output, not inf or NaN. Both ways of
    widening the tiles (a cast, or the inline conversion in registers) give it."""
    from batchlm.kernels.paged_decode import FP8_DECODE_CONFIG, paged_decode_attention

    torch.manual_seed(3)
    contexts, max_blocks = [300, 17, 64], 24
    meta = metadata(contexts, [1] * len(contexts), len(contexts), max_blocks)
    _, narrow = filled_caches(len(contexts) * max_blocks, 1.0, 1.0)
    query = (torch.randn(len(contexts), HEADS, HEAD_DIM, device=DEVICE) * query_magnitude).to(HALF)
    scale = HEAD_DIM**-0.5 / query_magnitude  # keeps the scores of both magnitudes alike
    config = replace(FP8_DECODE_CONFIG, fp8_in_registers=in_registers)
    out = paged_decode_attention(
        query, narrow, meta.seq_lens, meta.block_tables, scale, num_splits=num_splits, config=config
    )
    ref = paged_attention_reference(
        query, narrow.float(), list(range(len(contexts) + 1)), meta.seq_lens_cpu, meta.block_tables, scale
    )
    assert bool(out.isfinite().all())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0.0)
