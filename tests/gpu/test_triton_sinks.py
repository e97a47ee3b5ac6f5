"""Attention sinks (gpt-oss) in the Triton attention kernels, against TorchAttentionBackend (which
tests/test_attention_sinks.py pins to a float64 reference): decode with one split and several,
prefill over cached context and within a window, replayed in a CUDA graph with new lengths and sink
values, and over an FP8 cache, whose k_scale must not touch the sink logits.

GPU only (marked `gpu`); TRITON_INTERPRET=1 runs the 16-bit cases on the CPU through Triton's
interpreter (fp16). tests/test_attention_sinks_interpreted.py runs the kernels there on every run.
"""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, HALF, HALF_ATOL, INTERPRET, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from test_triton_window import BLOCK, CHUNKS, HEADS, on_device, scenario  # noqa: E402

from batchlm.attention.backend import AttentionSpec  # noqa: E402
from batchlm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from batchlm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from batchlm.kernels.fp8_types import FP8_DTYPE  # noqa: E402
from batchlm.kernels.paged_decode import paged_decode_attention  # noqa: E402
from models_harness import build_step  # noqa: E402

needs_gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPECS = [
    AttentionSpec(0.125, sinks=True),
    AttentionSpec(0.125, sliding_window=20, sinks=True),
    AttentionSpec(0.5, sliding_window=37, logit_softcap=3.0, sinks=True),
]
# Beside the scores (a missing or doubled sink shows there), far below and far above them.
SINKS = torch.tensor([-1.0, 0.0, 0.5, 1.5, 2.5, -30.0, 30.0, 0.25])
assert SINKS.shape == (HEADS,)


@pytest.mark.parametrize("sink_dtype", [torch.float32, HALF], ids=["float32", "model-dtype"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.sliding_window}-cap{s.logit_softcap}")
def test_triton_backend_matches_torch_with_sinks(spec: AttentionSpec, sink_dtype: torch.dtype) -> None:
    cache, q, k, v = scenario()
    _, _, meta = build_step(CHUNKS, BLOCK)
    half = [t.to(HALF) for t in (cache, q, k, v)]
    sinks = SINKS.to(sink_dtype)  # exact in 16 bits
    expected = TorchAttentionBackend().forward(
        *(t.float() for t in half[1:]), half[0].float(), meta, spec, sinks.float()
    )
    dev = [t.to(DEVICE) for t in half]
    out = TritonAttentionBackend().forward(
        dev[1], dev[2], dev[3], dev[0], on_device(meta), spec, sinks.to(DEVICE)
    )
    torch.testing.assert_close(out.float().cpu(), expected, atol=HALF_ATOL, rtol=0)


@pytest.mark.parametrize("splits", [1, 2, 4])
@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: f"w{s.sliding_window}")
def test_split_decode_folds_each_sink_in_once(spec: AttentionSpec, splits: int) -> None:
    cache, q, k, v = scenario(1)
    decodes = CHUNKS[:2]
    _, _, meta = build_step(decodes, BLOCK)
    half = [t.to(HALF) for t in (cache, q[:2], k[:2], v[:2])]
    expected = TorchAttentionBackend().forward(
        *(t.float() for t in half[1:]), half[0].float(), meta, spec, SINKS
    )
    without = TorchAttentionBackend().forward(
        *(t.float() for t in half[1:]), half[0].float(), meta, spec, SINKS * 0 - 1e4
    )
    assert (expected - without).abs().max() > 10 * HALF_ATOL  # the sinks matter to the case
    dev_meta = on_device(meta)
    dev_cache = half[0].to(DEVICE)
    TritonAttentionBackend().forward(
        *(t.to(DEVICE) for t in half[1:]), dev_cache, dev_meta, spec, SINKS.to(DEVICE)
    )  # the KV write
    out = paged_decode_attention(
        half[1].to(DEVICE), dev_cache, dev_meta.seq_lens, dev_meta.block_tables, spec.scale,
        num_splits=splits, window=spec.sliding_window, sinks=SINKS.to(DEVICE),
    )  # fmt: skip
    torch.testing.assert_close(out.float().cpu(), expected, atol=HALF_ATOL, rtol=0)


@needs_gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_with_sinks_replays_in_a_cuda_graph(splits: int) -> None:
    """The sinks are read from the device on each replay: new values (a layer's) and new lengths
    give what a fresh launch gives."""
    cache, q, k, v = scenario(2)
    spec = SPECS[1]
    decodes = CHUNKS[:2]
    _, _, meta = build_step(decodes, BLOCK)
    dev_meta = on_device(meta)
    dev_cache = cache.to(HALF).to(DEVICE)
    query = q[:2].to(HALF).to(DEVICE)
    TritonAttentionBackend().forward(
        query.clone(),
        k[:2].to(HALF).to(DEVICE),
        v[:2].to(HALF).to(DEVICE),
        dev_cache,
        dev_meta,
        spec,
        SINKS.to(DEVICE),
    )  # the KV write
    sinks = SINKS.to(DEVICE)
    seq_lens = dev_meta.seq_lens.clone()
    out = torch.empty_like(query)

    def decode() -> None:
        paged_decode_attention(
            query, dev_cache, seq_lens, dev_meta.block_tables, spec.scale, out=out, num_splits=splits,
            window=spec.sliding_window, sinks=sinks,
        )  # fmt: skip

    decode()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode()
    for new_sinks, shorter in ((SINKS.flip(0), 0), (SINKS - 2.0, 3), (SINKS + 3.0, 9)):  # lengths >= 1
        sinks.copy_(new_sinks)
        lengths = dev_meta.seq_lens - shorter
        seq_lens.copy_(lengths)
        graph.replay()
        fresh = paged_decode_attention(
            query, dev_cache, lengths, dev_meta.block_tables, spec.scale, num_splits=splits,
            window=spec.sliding_window, sinks=new_sinks.to(DEVICE),
        )  # fmt: skip
        torch.testing.assert_close(out, fresh, atol=0, rtol=0)


@needs_gpu
@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: f"w{s.sliding_window}")
def test_fp8_cache_with_sinks_leaves_the_sink_logits_unscaled(spec: AttentionSpec) -> None:
    """An FP8 cache holds key / k_scale: k_scale joins the scores' scale, never the sinks (raw
    logits), and v_scale the output. The new keys and values are e4m3 values times their scales, so
    the torch backend over the dequantized cache is the reference up to the kernels' rounding."""
    k_scale, v_scale = 0.5, 2.0
    cache, q, k, v = scenario(3)
    narrow = cache.to(FP8_DTYPE)
    k = k.to(FP8_DTYPE).float() * k_scale
    v = v.to(FP8_DTYPE).float() * v_scale
    dequantized = narrow.float()
    dequantized[0] *= k_scale
    dequantized[1] *= v_scale
    _, _, meta = build_step(CHUNKS, BLOCK)
    expected = TorchAttentionBackend().forward(q, k, v, dequantized, meta, spec, SINKS)
    backend = TritonAttentionBackend()
    fp8_cache = narrow.to(DEVICE)
    backend.set_kv_scales([fp8_cache], [(k_scale, v_scale)])
    dev = [t.to(HALF).to(DEVICE) for t in (q, k, v)]
    out = backend.forward(*dev, fp8_cache, on_device(meta), spec, SINKS.to(DEVICE))
    assert bool(out.isfinite().all())
    # bf16 queries, keys and values (exact here), and outputs up to v_scale = 2 in magnitude.
    torch.testing.assert_close(out.float().cpu(), expected, atol=2 * HALF_ATOL, rtol=0)


def test_warm_up_launches_the_sink_variants_the_layers_use() -> None:
    cache = torch.zeros(2, 4, BLOCK, 2, 64, device=DEVICE, dtype=HALF)
    launched: list[tuple[int | None, bool]] = []
    backend = TritonAttentionBackend()
    original = backend._warm_up_variant

    def record(
        kv_cache: torch.Tensor, heads: int, blocks: int, spec: AttentionSpec, query_dtype: torch.dtype | None
    ) -> None:
        launched.append((spec.sliding_window, spec.sinks))
        original(kv_cache, heads, blocks, spec, query_dtype)

    backend._warm_up_variant = record  # type: ignore[method-assign]
    # gpt-oss: windowed and full layers, each with sinks; one layer without them beside.
    specs = [AttentionSpec(0.1, 128, sinks=True), AttentionSpec(0.1, None, sinks=True)] * 2
    backend.warm_up(cache, HEADS, 4, [*specs, AttentionSpec(0.1, 128)])
    assert launched == [(128, True), (None, True), (128, False)]
