"""Tests for batchlm.backends.mlx.engine (MLXEngine as an EngineClient) and backend selection in
batchlm.backends: streaming deltas, stop strings, n > 1, aborts, limits, stats and shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import batchlm.backends as backends
from batchlm.config import EngineConfig
from batchlm.engine.client import EngineDeadError, QueueFullError, RequestRejectedError
from batchlm.outputs import RequestOutput
from batchlm.sampling_params import SamplingParams

T = TypeVar("T")
# Long enough for any loaded machine: what it catches is a start() that never ends.
HANG_GUARD_S = 300
needs_mlx = pytest.mark.skipif(not backends.mlx_available(), reason="mlx and mlx-lm are not installed")


class EngineHarness:
    """One started MLXEngine on a private event loop, shared by the tests of this module."""

    def __init__(self, config: EngineConfig, max_queue: int | None = None) -> None:
        from batchlm.backends.mlx.engine import MLXEngine

        self.loop = asyncio.new_event_loop()
        self.engine = MLXEngine(config, max_queue=max_queue)
        self.run(self.engine.start())

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 60))

    def collect(self, prompt: list[int], params: SamplingParams, request_id: str) -> list[RequestOutput]:
        async def consume() -> list[RequestOutput]:
            return [output async for output in self.engine.generate(prompt, params, request_id)]

        return self.run(consume())

    def first(self, prompt: list[int], params: SamplingParams, request_id: str) -> RequestOutput:
        """The first output of a request (rejections are raised before it)."""
        return self.run(self.engine.generate(prompt, params, request_id).__anext__())

    def wait_idle(self) -> None:
        async def idle() -> None:
            while self.engine.stats().num_running or self.engine.stats().num_waiting:
                await asyncio.sleep(0.01)

        self.run(idle())

    def close(self) -> None:
        self.run(self.engine.shutdown())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(tiny_model_dir: Callable[..., Path]) -> Iterator[EngineHarness]:
    if not backends.mlx_available():
        pytest.skip("mlx and mlx-lm are not installed")
    started = EngineHarness(EngineConfig(model=str(tiny_model_dir("llama")), max_num_seqs=4))
    yield started
    started.close()


def prompt_of(harness: EngineHarness, text: str = "Tell me a story about a cat") -> list[int]:
    return harness.engine.tokenizer.encode(text)


def joined(outputs: list[RequestOutput], index: int = 0) -> tuple[str, list[int]]:
    text, token_ids = "", []
    for output in outputs:
        for completion in output.outputs:
            if completion.index == index:
                text += completion.text
                token_ids += completion.token_ids
    return text, token_ids


@needs_mlx
def test_streams_deltas_that_add_up_to_the_completion(harness: EngineHarness) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = harness.collect(prompt_of(harness), params, "stream")
    text, token_ids = joined(outputs)
    assert len(outputs) > 1 and len(token_ids) == 12
    assert text == harness.engine.tokenizer.decode(token_ids)
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert outputs[-1].outputs[0].finish_reason == "length"
    assert all(c.finish_reason is None for o in outputs[:-1] for c in o.outputs)


@needs_mlx
def test_stop_string_cuts_the_text_and_is_reported(harness: EngineHarness) -> None:
    prompt = prompt_of(harness)
    full, _ = joined(
        harness.collect(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), "full")
    )
    stop = next(
        full[i : i + 2] for i in range(4, len(full) - 2) if full[i : i + 2].strip() == full[i : i + 2]
    )
    stopped = harness.collect(
        prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]), "cut"
    )
    text, _ = joined(stopped)
    assert text == full[: full.index(stop)]
    assert stopped[-1].outputs[-1].finish_reason == "stop" and stopped[-1].outputs[-1].stop_reason == stop
    harness.wait_idle()


@needs_mlx
def test_n_completions_fan_in_and_seed_reproduces_them(harness: EngineHarness) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    first = harness.collect(prompt_of(harness), params, "fan")
    again = harness.collect(prompt_of(harness), params, "fan-again")
    texts = [joined(first, i) for i in range(3)]
    assert all(len(ids) == 6 for _, ids in texts)
    assert texts == [joined(again, i) for i in range(3)]
    assert len({tuple(ids) for _, ids in texts}) > 1
    assert first[-1].finished and {c.finish_reason for c in first[-1].outputs} == {"length"}


@needs_mlx
def test_logprobs_travel_with_each_token(harness: EngineHarness) -> None:
    outputs = harness.collect(
        prompt_of(harness), SamplingParams(temperature=0.0, max_tokens=5, logprobs=2), "lp"
    )
    completions = [c for o in outputs for c in o.outputs]
    assert sum(len(c.logprobs or []) for c in completions) == sum(len(c.token_ids) for c in completions)
    assert all(lp.rank == 1 and len(lp.top) == 2 for c in completions for lp in c.logprobs or [])


@needs_mlx
def test_closing_the_stream_aborts_the_request(harness: EngineHarness) -> None:
    async def read_one_then_leave() -> None:
        stream = harness.engine.generate(
            prompt_of(harness), SamplingParams(max_tokens=400, ignore_eos=True), "left"
        )
        await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]

    harness.run(read_one_then_leave())
    harness.wait_idle()
    assert harness.engine.stats().num_running == 0


@needs_mlx
def test_abort_ends_the_consumer_with_cancellation(harness: EngineHarness) -> None:
    async def abort_midway() -> None:
        stream = harness.engine.generate(
            prompt_of(harness), SamplingParams(max_tokens=400, ignore_eos=True), "cut"
        )
        await stream.__anext__()
        await harness.engine.abort("cut")
        with pytest.raises(asyncio.CancelledError):
            await stream.__anext__()

    harness.run(abort_midway())
    harness.wait_idle()


@needs_mlx
def test_requests_beyond_the_limits_are_rejected(harness: EngineHarness) -> None:
    limit = harness.engine.model_info.facts.max_model_len
    with pytest.raises(RequestRejectedError) as too_long:
        harness.first([5] * limit, SamplingParams(), "long")
    assert too_long.value.param == "messages"
    with pytest.raises(RequestRejectedError) as too_many:
        harness.first([5, 6], SamplingParams(max_tokens=limit), "many")
    assert too_many.value.param == "max_tokens"
    with pytest.raises(RequestRejectedError, match="out of range"):
        harness.first([10**6], SamplingParams(), "vocab")


@needs_mlx
def test_a_running_request_id_cannot_be_reused(harness: EngineHarness) -> None:
    async def twice() -> None:
        first = harness.engine.generate(
            prompt_of(harness), SamplingParams(max_tokens=50, ignore_eos=True), "dup"
        )
        await first.__anext__()
        with pytest.raises(RequestRejectedError, match="already in use"):
            await harness.engine.generate([5], SamplingParams(), "dup").__anext__()
        await first.aclose()  # type: ignore[attr-defined]

    harness.run(twice())
    harness.wait_idle()


@needs_mlx
def test_stats_count_tokens_and_prefix_hits(harness: EngineHarness) -> None:
    before = harness.engine.stats()
    prompt = prompt_of(harness, "A prompt that is repeated twice for the cache")
    for name in ("cache-1", "cache-2"):
        outputs = harness.collect(
            prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), name
        )
    after = harness.engine.stats()
    assert after.prompt_tokens_total - before.prompt_tokens_total == 2 * len(prompt)
    assert after.generation_tokens_total - before.generation_tokens_total == 8
    assert outputs[-1].num_cached_tokens == len(prompt) - 1
    assert after.prefix_cache_hits - before.prefix_cache_hits >= len(prompt) - 1
    # Idle: the prompt cache keeps the KV for reuse, evictable and so counted as free.
    assert after.kv_cache_usage == 0.0 and after.num_preemptions == 0


@needs_mlx
def test_a_full_queue_refuses_new_requests(tiny_model_dir: Callable[..., Path]) -> None:
    small = EngineHarness(EngineConfig(model=str(tiny_model_dir("llama")), max_num_seqs=1), max_queue=0)

    async def overflow() -> None:
        running = small.engine.generate([0, 5, 6], SamplingParams(max_tokens=200, ignore_eos=True), "a")
        await running.__anext__()
        with pytest.raises(QueueFullError, match="max-queue"):
            await small.engine.generate([0, 5, 6], SamplingParams(), "b").__anext__()
        await running.aclose()  # type: ignore[attr-defined]

    try:
        small.run(overflow())
    finally:
        small.close()


@needs_mlx
def test_shutdown_ends_open_streams_and_later_requests(tiny_model_dir: Callable[..., Path]) -> None:
    doomed = EngineHarness(EngineConfig(model=str(tiny_model_dir("llama"))))

    async def shut_down_midway() -> None:
        stream = doomed.engine.generate([0, 5, 6], SamplingParams(max_tokens=400, ignore_eos=True), "open")
        await stream.__anext__()
        await doomed.engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await doomed.engine.generate([0, 5], SamplingParams(), "late").__anext__()

    doomed.run(shut_down_midway())
    assert doomed.engine.is_dead and not doomed.engine.is_ready
    doomed.loop.close()


@needs_mlx
def test_a_model_that_cannot_load_fails_start_by_name(tmp_path: Path) -> None:
    from batchlm.backends.mlx.engine import MLXEngine

    engine = MLXEngine(EngineConfig(model=str(tmp_path / "missing")))
    with pytest.raises(EngineDeadError, match="missing"):
        # The timeout only guards against a hang: a failed load must end start(), not stall it.
        asyncio.run(asyncio.wait_for(engine.start(), HANG_GUARD_S))
    assert engine.is_dead


@needs_mlx
def test_a_hub_id_that_cannot_be_fetched_fails_start_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchlm.backends.mlx.engine import MLXEngine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach the network from tests
    engine = MLXEngine(EngineConfig(model="mlx-community/SmolLM2-135M-Instruct-4bit"))
    with pytest.raises(EngineDeadError, match="mlx-community/SmolLM2-135M-Instruct-4bit"):
        asyncio.run(engine.start())


def test_auto_picks_mlx_only_on_apple_silicon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "mlx_available", lambda: True)
    monkeypatch.setattr(backends, "is_apple_silicon", lambda: False)
    assert backends.resolve_backend("auto") == "torch"
    monkeypatch.setattr(backends, "is_apple_silicon", lambda: True)
    assert backends.resolve_backend("auto") == "mlx"
    monkeypatch.setattr(backends, "mlx_available", lambda: False)
    assert backends.resolve_backend("auto") == "torch"
    assert backends.resolve_backend("torch") == "torch"


def test_explicit_mlx_without_mlx_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "mlx_available", lambda: False)
    with pytest.raises(ValueError, match=r"batchlm\[mlx\]"):
        backends.resolve_backend("mlx")
    with pytest.raises(ValueError, match="unknown backend 'metal'"):
        backends.resolve_backend("metal")


@needs_mlx
def test_create_engine_builds_the_chosen_backend_without_loading() -> None:
    from batchlm.backends.mlx.engine import MLXEngine

    engine = backends.create_engine("mlx", EngineConfig(model="/nowhere"), max_queue=3)
    assert isinstance(engine, MLXEngine) and engine.max_queue == 3 and not engine.is_ready
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        backends.create_engine("mlx", EngineConfig(tensor_parallel_size=2))
