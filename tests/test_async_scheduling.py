"""Async scheduling (one step in flight): the scheduler with placeholder tokens against a fake runner,
and the whole CPU engine with async scheduling on against off: the same greedy and seeded tokens for
mixed batches with stops, max_tokens, aborts mid-flight, preemption, prefix hits, n > 1, penalties
and logprobs, and no KV block held at the end."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.config import EngineConfig
from batchlm.core.engine_core import EngineCore
from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID, ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from batchlm.executor.core_builder import check_async_scheduling, resolve_async_scheduling
from batchlm.outputs import EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest
from scheduler_harness import Driver, PagedFakeRunner, Trace, make_request, reference_generation

CONFIG = SchedulerConfig(
    max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=40
)


class PlaceholderFakeRunner(PagedFakeRunner):
    """The scheduler harness's paged fake runner, which also accepts placeholder tokens: like the real
    runner it knows what it sampled in the previous step and puts that token in the placeholder's place."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self.previous_samples: dict[str, int] = {}
        self.num_placeholders = 0

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        chunks = tuple(self._resolve(chunk) for chunk in step.chunks)
        result = super().execute(SchedulerOutput(chunks, step.new_requests, step.finished_request_ids))
        self.previous_samples = dict(zip(result.request_ids, result.sampled_token_ids, strict=True))
        return result

    def _resolve(self, chunk: ScheduledChunk) -> ScheduledChunk:
        if PLACEHOLDER_TOKEN_ID not in chunk.token_ids:
            return chunk
        assert chunk.token_ids == (PLACEHOLDER_TOKEN_ID,), "a placeholder outside a one-token decode"
        assert chunk.start_position == len(self.tokens[chunk.request_id]) - 1, (
            "placeholder is not the last token"
        )
        self.num_placeholders += 1
        token = self.previous_samples[chunk.request_id]  # KeyError: it sampled nothing last step
        return ScheduledChunk(
            chunk.request_id, (token,), chunk.start_position, chunk.new_block_ids, chunk.sample
        )


class AsyncDriver(Driver):
    """Drives scheduler + fake runner as the async engine core does: step N+1 is scheduled and run
    before step N's result is folded in. Checks the harness's per-step contract and that no chunk
    reaches past a request's last token (max_tokens or the context limit)."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.runner = PlaceholderFakeRunner(config.num_blocks, config.block_size)
        self.in_flight: tuple[SchedulerOutput, ModelRunnerOutput] | None = None
        self.limits: dict[str, int] = {}

    def add(self, request: EngineCoreRequest) -> None:
        super().add(request)
        max_tokens = request.sampling_params.max_tokens or self.config.max_model_len
        # The last generated token is never fed back, so no chunk reaches its position.
        self.limits[request.request_id] = (
            min(len(request.prompt_token_ids) + max_tokens, self.config.max_model_len) - 1
        )

    def step(self) -> SchedulerOutput:
        scheduled = self.scheduler.schedule()
        self.check_step(scheduled)
        for chunk in scheduled.chunks:
            assert chunk.start_position + len(chunk.token_ids) <= self.limits[chunk.request_id], (
                "past the limit"
            )
        launched = (scheduled, self.runner.execute(scheduled)) if not scheduled.is_empty else None
        previous, self.in_flight = self.in_flight, launched
        if previous is not None:
            self.record(self.scheduler.update_from_output(*previous))
        self.trace.steps.append(scheduled)
        return scheduled

    def run(self, max_steps: int = 10_000) -> Trace:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests() and self.in_flight is None:
                return self.trace
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps")


def _prompts(count: int, length: int = 11, shared: int = 0) -> list[list[int]]:
    base = [(7 * i + 3) % 500 for i in range(shared)]
    return [base + [(31 * r + 17 * i + 5) % 500 for i in range(length)] for r in range(count)]


def _assert_all_blocks_free(scheduler: Scheduler) -> None:
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    assert scheduler.stats().kv_cache_usage == 0.0
    assert scheduler.num_inflight_steps == 0


def test_async_driver_matches_reference_and_uses_placeholders() -> None:
    driver = AsyncDriver(CONFIG)
    prompts = _prompts(6, length=9)
    for index, prompt in enumerate(prompts):
        driver.add(make_request(f"r{index}", prompt, max_tokens=3 + index))
    trace = driver.run()
    for index, prompt in enumerate(prompts):
        assert trace.tokens[f"r{index}"] == reference_generation(prompt, 3 + index)
        assert trace.finish[f"r{index}"] is FinishReason.LENGTH
    assert driver.runner.num_placeholders > 0
    _assert_all_blocks_free(driver.scheduler)


def test_tokens_found_to_stop_discard_the_step_already_launched() -> None:
    prompt = _prompts(1)[0]
    expected = reference_generation(prompt, 10)
    stop = expected[3]
    driver = AsyncDriver(CONFIG)
    driver.add(make_request("stops", prompt, max_tokens=10, eos=[stop]))
    driver.add(make_request("runs", _prompts(2)[1], max_tokens=10))
    trace = driver.run()
    assert trace.tokens["stops"] == expected[: expected.index(stop) + 1]
    assert trace.finish["stops"] is FinishReason.STOP
    # The step launched before the stop was known still computed a token for it: thrown away.
    decodes = [c for step in trace.steps for c in step.chunks if c.request_id == "stops" and c.sample]
    assert len(decodes) == len(trace.tokens["stops"]) + 1
    assert trace.tokens["runs"] == reference_generation(_prompts(2)[1], 10)
    _assert_all_blocks_free(driver.scheduler)


def test_in_flight_tokens_never_pass_max_tokens_or_the_context() -> None:
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=16, block_size=4, num_blocks=40
    )
    driver = AsyncDriver(config)  # its step() asserts no chunk reaches past a request's last token
    driver.add(make_request("short", _prompts(1)[0], max_tokens=2))
    driver.add(make_request("context", _prompts(2)[1], max_tokens=None))
    trace = driver.run()
    assert len(trace.tokens["short"]) == 2
    assert len(trace.tokens["context"]) == 16 - len(_prompts(2)[1])
    assert trace.finish == {"short": FinishReason.LENGTH, "context": FinishReason.LENGTH}
    _assert_all_blocks_free(driver.scheduler)


def test_abort_with_a_step_in_flight() -> None:
    driver = AsyncDriver(CONFIG)
    prompts = _prompts(3)
    for index, prompt in enumerate(prompts):
        driver.add(make_request(f"r{index}", prompt, max_tokens=8))
    for _ in range(4):
        driver.step()
    assert driver.in_flight is not None and any(c.request_id == "r1" for c in driver.in_flight[0].chunks)
    emitted = list(driver.trace.tokens["r1"])
    [output] = driver.scheduler.abort_requests(["r1"])
    assert output.finish_reason is FinishReason.ABORT
    trace = driver.run()
    assert trace.tokens["r1"] == emitted  # the in-flight token of the aborted request is dropped
    assert "r1" in trace.steps[4].finished_request_ids
    for index in (0, 2):
        assert trace.tokens[f"r{index}"] == reference_generation(prompts[index], 8)
    _assert_all_blocks_free(driver.scheduler)


def test_preemption_with_a_step_in_flight_resumes_exactly() -> None:
    # 12 blocks of 4 tokens: four requests growing to 27 tokens each cannot all stay.
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=12
    )
    driver = AsyncDriver(config)
    prompts = _prompts(4, length=7)
    for index, prompt in enumerate(prompts):
        driver.add(make_request(f"r{index}", prompt, max_tokens=20))
    trace = driver.run()
    assert driver.scheduler.stats().num_preemptions > 0
    for index, prompt in enumerate(prompts):
        assert trace.tokens[f"r{index}"] == reference_generation(prompt, 20)
    _assert_all_blocks_free(driver.scheduler)


def test_prefix_hits_under_async_scheduling() -> None:
    driver = AsyncDriver(CONFIG)
    prompts = _prompts(3, length=3, shared=12)
    driver.add(make_request("first", prompts[0], max_tokens=9))
    for _ in range(3):
        driver.step()
    # "third" continues first's prompt with first's own tokens: it can hit a block holding generated
    # tokens, which was committed only once its tokens were known.
    third = prompts[0] + reference_generation(prompts[0], 5)
    driver.add(make_request("second", prompts[1], max_tokens=9))
    driver.add(make_request("third", third, max_tokens=9))
    trace = driver.run()
    assert trace.first_outputs["second"].num_cached_tokens == 12
    assert trace.first_outputs["third"].num_cached_tokens == 16
    assert trace.tokens["first"] == reference_generation(prompts[0], 9)
    assert trace.tokens["second"] == reference_generation(prompts[1], 9)
    assert trace.tokens["third"] == reference_generation(third, 9)
    _assert_all_blocks_free(driver.scheduler)


def test_steps_must_be_updated_in_order() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(make_request("r", [1, 2, 3]))
    first = scheduler.schedule()
    second = scheduler.schedule()
    assert second.chunks[0].token_ids == (PLACEHOLDER_TOKEN_ID,) and second.chunks[0].start_position == 3
    with pytest.raises(RuntimeError, match="not the oldest one in flight"):
        scheduler.update_from_output(second, ModelRunnerOutput(("r",), (7,), (None,)))
    [output] = scheduler.update_from_output(first, ModelRunnerOutput(("r",), (7,), (None,)))
    assert output.new_token_ids == (7,)


# -- the CPU engine, async scheduling on against off ------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Callable[..., Path]) -> LLM:
    """One CPU engine for every test below: each test gives it fresh engine cores (scheduler + the same
    model runner) with the scheduler limits it needs, so the model is loaded once."""
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", async_scheduling="off")
    _BASE_CONFIG[id(llm)] = llm.engine_core.scheduler.config
    return llm


_BASE_CONFIG: dict[int, SchedulerConfig] = {}


def _use_core(llm: LLM, mode: str, **limits: Any) -> EngineCore:
    """Point `llm` at a new engine core over its runner, async scheduling on or off, with scheduler limits
    (max_num_seqs, max_num_batched_tokens, num_blocks, enable_prefix_caching) changed from the defaults."""
    old = llm.engine_core
    assert not old.has_work()
    config = dataclasses.replace(_BASE_CONFIG[id(llm)], **limits)
    llm.engine_core = EngineCore(Scheduler(config), old.executor, async_scheduling=mode == "on")
    return llm.engine_core


def _engine_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(10, 300, (n,), generator=generator).tolist() for n in (5, 17, 33, 9, 48, 1, 20)]


def _run(llm: LLM, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Any]:
    outputs = llm.generate(list(prompts), list(params))
    _assert_all_blocks_free(llm.engine_core.scheduler)
    return [
        [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in output.outputs]
        for output in outputs
    ]


def _mixed_params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=16, min_tokens=4, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11, max_tokens=14, n=2),
        SamplingParams(
            temperature=0.0, max_tokens=10, repetition_penalty=1.4, frequency_penalty=0.3, logprobs=2
        ),
        SamplingParams(temperature=0.7, seed=5, max_tokens=9, presence_penalty=0.6, logit_bias={42: 3.0}),
    ]


def _stop_token(llm: LLM) -> int:
    """A token that the greedy third request really produces early on, so the stop fires mid-batch."""
    [output] = llm.generate(
        [_engine_prompts()[2]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    )
    return output.outputs[0].token_ids[3]


def _same_outputs(off: list[Any], on: list[Any]) -> None:
    assert len(off) == len(on)
    for sync_request, async_request in zip(off, on, strict=True):
        for (ids, finish, stop, logprobs), (ids2, finish2, stop2, logprobs2) in zip(
            sync_request, async_request, strict=True
        ):
            assert (ids, finish, stop) == (ids2, finish2, stop2)
            if logprobs is None:
                assert logprobs2 is None
                continue
            for first, second in zip(logprobs, logprobs2, strict=True):
                assert first.rank == second.rank and [t for t, _ in first.top] == [t for t, _ in second.top]
                assert first.logprob == pytest.approx(second.logprob, abs=1e-4)


@pytest.mark.parametrize(
    "limits",
    [
        {},
        {"max_num_batched_tokens": 8, "max_num_seqs": 3},  # chunked prefill, requests queue
        {"num_blocks": 9, "enable_prefix_caching": False},  # 144 KV slots for ~230 tokens: preemption
    ],
    ids=["batched", "chunked", "preempting"],
)
def test_engine_async_on_equals_off(llm: LLM, limits: dict[str, Any]) -> None:
    _use_core(llm, "off")
    params = _mixed_params(_stop_token(llm))
    _use_core(llm, "off", **limits)
    off = _run(llm, _engine_prompts(), params)
    on_core = _use_core(llm, "on", **limits)
    on = _run(llm, _engine_prompts(), params)
    _same_outputs(off, on)
    assert off[2][0][1] == "stop" and len(off[2][0][0]) < 20  # the stop token did end a request early
    if "num_blocks" in limits:
        assert on_core.stats().num_preemptions > 0


def test_engine_prefix_hits_async(llm: LLM) -> None:
    base = _engine_prompts()[4]
    prompts = [[*base, 11, 12], [*base, 13], [*base, 11, 12]]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    _use_core(llm, "off", enable_prefix_caching=False)
    expected = _run(llm, prompts, [greedy] * 3)
    core = _use_core(llm, "on")
    first = _run(llm, prompts[:1], [greedy])
    rest = _run(llm, prompts[1:], [greedy] * 2)
    assert first + rest == expected
    assert core.stats().prefix_cache_hits > 0


def _core_outputs(core: EngineCore, abort_after: int | None) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    finished: dict[str, FinishReason] = {}
    for step in range(1000):
        if not core.has_work():
            break
        outputs: list[EngineCoreOutput] = core.step()
        if step == abort_after:
            outputs += core.abort_requests(["r1"])
        for output in outputs:
            assert output.request_id not in finished, "output after the request finished"
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finish_reason is not None:
                finished[output.request_id] = output.finish_reason
    assert set(finished) == set(tokens)
    return tokens


def test_engine_abort_mid_flight(llm: LLM) -> None:
    def submit(core: EngineCore) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        for index, prompt in enumerate(_engine_prompts()[:4]):
            core.add_request(EngineCoreRequest(f"r{index}", tuple(prompt), params, (1,), arrival_time=0.0))

    off_core = _use_core(llm, "off")
    submit(off_core)
    expected = _core_outputs(off_core, abort_after=None)
    on_core = _use_core(llm, "on")
    submit(on_core)
    tokens = _core_outputs(on_core, abort_after=3)
    assert 0 < len(tokens["r1"]) < 12 and tokens["r1"] == expected["r1"][: len(tokens["r1"])]
    assert {k: v for k, v in tokens.items() if k != "r1"} == {k: v for k, v in expected.items() if k != "r1"}
    _assert_all_blocks_free(on_core.scheduler)


def test_async_scheduling_switch() -> None:
    assert resolve_async_scheduling(EngineConfig(), "cuda:0") is True
    assert resolve_async_scheduling(EngineConfig(), "cpu") is False
    assert resolve_async_scheduling(EngineConfig(async_scheduling="on"), "cpu") is True
    assert resolve_async_scheduling(EngineConfig(async_scheduling="off"), "cuda:0") is False
    assert resolve_async_scheduling(EngineConfig(tensor_parallel_size=2), "cuda:0") is False
    with pytest.raises(ValueError, match="not supported with --tensor-parallel-size"):
        check_async_scheduling(EngineConfig(async_scheduling="on", tensor_parallel_size=2))
    with pytest.raises(ValueError, match="must be one of auto, on, off"):
        check_async_scheduling(EngineConfig(async_scheduling="yes"))


def test_async_scheduling_flag() -> None:
    import argparse

    from batchlm.flags import add_engine_arguments

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert parser.parse_args([]).async_scheduling == "auto"
    assert parser.parse_args(["--async-scheduling", "off"]).async_scheduling == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["--async-scheduling", "maybe"])


def test_engine_core_refuses_async_without_execute_async() -> None:
    class SyncOnly:
        def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="needs an executor with execute_async"):
        EngineCore(Scheduler(CONFIG), SyncOnly(), async_scheduling=True)
