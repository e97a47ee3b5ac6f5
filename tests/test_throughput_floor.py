"""benchmarks/throughput_floor.py: the floor of the steps the scheduler makes with a bounded KV cache
agrees with the closed form when the cache holds everything, and pays for preemption when it does not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def floor(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import throughput_floor

    yield throughput_floor
    sys.modules.pop("throughput_floor", None)


def test_a_cache_holding_every_request_gives_the_closed_form(floor) -> None:  # type: ignore[no-untyped-def]
    from model_shapes import SHAPES

    config = SHAPES["llama-3.2-1b"]
    closed = floor.workload_floor(config, 64, 256, 64)
    scheduled = floor.scheduled_floor(config, 64, 256, 64, kv_capacity_tokens=64 * 400)
    assert scheduled["preemptions"] == 0 and scheduled["prefill_tokens"] == 64 * 256
    # Chunked prefill costs each chunk's step alone; the closed form costs one pass over all prompts.
    assert scheduled["floor_s"] == pytest.approx(closed["floor_s"], rel=0.05)


def test_a_small_cache_preempts_and_recomputes(floor) -> None:  # type: ignore[no-untyped-def]
    from model_shapes import SHAPES

    config = SHAPES["llama-3.2-1b"]
    ample = floor.scheduled_floor(config, 64, 256, 64, kv_capacity_tokens=64 * 400)
    small = floor.scheduled_floor(config, 64, 256, 64, kv_capacity_tokens=40 * 336)
    assert small["preemptions"] > 0 and small["prefill_tokens"] > 64 * 256
    assert small["floor_s"] > ample["floor_s"]
    # An admission limit that fits the cache avoids the recompute: only the prompts are prefilled.
    limited = floor.scheduled_floor(config, 64, 256, 64, kv_capacity_tokens=40 * 336, max_num_seqs=40)
    assert limited["preemptions"] == 0 and limited["prefill_tokens"] == 64 * 256


def test_kernels_in_turn_cost_at_least_the_overlapped_floor(floor) -> None:  # type: ignore[no-untyped-def]
    from model_shapes import SHAPES

    config = SHAPES["llama-3.1-8b"]
    # Many long decodes: attention's cache reads and the linears' FLOPs both matter, so running them
    # in turn costs more than overlapping them.
    overlapped = floor.workload_floor(config, 256, 512, 32)
    in_turn = floor.workload_floor(config, 256, 512, 32, overlap=False)
    assert in_turn["floor_s"] > overlapped["floor_s"]
    # One request: every step is bound by the weights alone, so the two agree.
    single = floor.workload_floor(config, 1, 512, 32)
    assert floor.workload_floor(config, 1, 512, 32, overlap=False)["floor_s"] == pytest.approx(
        single["floor_s"], rel=1e-3
    )


def test_quantized_formats_cost_their_bytes_and_keep_the_lm_head_bf16(floor) -> None:  # type: ignore[no-untyped-def]
    from model_shapes import SHAPES

    config = SHAPES["llama-3.1-8b"]
    cost = floor.shape_cost(config)
    step = {
        weights: floor.workload_floor(config, 1, 512, 32, formats=floor.Formats(weights))[
            "floor_decode_step_ms"
        ]
        for weights in ("bf16", "fp8", "w4a16")
    }
    # A single stream reads its weights once a step: the layers' linears at the format's bytes, the
    # LM head at two bytes a value whatever the format.
    lm_head_ms = 1e3 * cost.lm_head_params * 2 / floor.H200_BANDWIDTH
    assert step["bf16"] - lm_head_ms == pytest.approx(2 * (step["fp8"] - lm_head_ms), rel=0.02)
    assert step["w4a16"] > step["bf16"] / 4 + lm_head_ms / 2
    assert step["w4a16"] < step["fp8"] < step["bf16"]


def test_an_fp8_cache_halves_the_cache_reads_of_long_decodes(floor) -> None:  # type: ignore[no-untyped-def]
    from model_shapes import SHAPES

    config = SHAPES["llama-3.1-8b"]
    # 512 decodes at ~1,500 tokens: the cache reads outweigh the weights.
    bf16 = floor.workload_floor(config, 512, 1000, 1000, overlap=False)
    fp8_cache = floor.workload_floor(
        config, 512, 1000, 1000, overlap=False, formats=floor.Formats(kv_cache="fp8")
    )
    assert fp8_cache["floor_decode_s"] < 0.75 * bf16["floor_decode_s"]
    # The prompts' pass is bound by FLOPs, which the cache format does not change.
    assert fp8_cache["floor_prefill_s"] == pytest.approx(bf16["floor_prefill_s"], rel=1e-3)
