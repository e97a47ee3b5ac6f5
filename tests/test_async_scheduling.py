"""Async scheduling (one step in flight): the scheduler with placeholder tokens against a fake runner
(stops, max_tokens, aborts mid-flight, preemption, prefix hits, no KV block held at the end), and the
switch that turns it on. The whole engine, on against off: test_async_scheduling_engine.py."""

from __future__ import annotations

import pytest

from batchlm.config import EngineConfig
from batchlm.core.engine_core import EngineCore
from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID, ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from batchlm.executor.core_builder import check_async_scheduling, resolve_async_scheduling
from batchlm.outputs import FinishReason
from batchlm.request import EngineCoreRequest
from scheduler_harness import (
    Driver,
    PagedFakeRunner,
    Trace,
    assert_all_blocks_free,
    make_request,
    reference_generation,
    varied_prompts,
)

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


def test_async_driver_matches_reference_and_uses_placeholders() -> None:
    driver = AsyncDriver(CONFIG)
    prompts = varied_prompts(6, length=9)
    for index, prompt in enumerate(prompts):
        driver.add(make_request(f"r{index}", prompt, max_tokens=3 + index))
    trace = driver.run()
    for index, prompt in enumerate(prompts):
        assert trace.tokens[f"r{index}"] == reference_generation(prompt, 3 + index)
        assert trace.finish[f"r{index}"] is FinishReason.LENGTH
    assert driver.runner.num_placeholders > 0
    assert_all_blocks_free(driver.scheduler)


def test_tokens_found_to_stop_discard_the_step_already_launched() -> None:
    prompt = varied_prompts(1)[0]
    expected = reference_generation(prompt, 10)
    stop = expected[3]
    driver = AsyncDriver(CONFIG)
    driver.add(make_request("stops", prompt, max_tokens=10, eos=[stop]))
    driver.add(make_request("runs", varied_prompts(2)[1], max_tokens=10))
    trace = driver.run()
    assert trace.tokens["stops"] == expected[: expected.index(stop) + 1]
    assert trace.finish["stops"] is FinishReason.STOP
    # The step launched before the stop was known still computed a token for it: thrown away.
    decodes = [c for step in trace.steps for c in step.chunks if c.request_id == "stops" and c.sample]
    assert len(decodes) == len(trace.tokens["stops"]) + 1
    assert trace.tokens["runs"] == reference_generation(varied_prompts(2)[1], 10)
    assert_all_blocks_free(driver.scheduler)


def test_in_flight_tokens_never_pass_max_tokens_or_the_context() -> None:
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=16, block_size=4, num_blocks=40
    )
    driver = AsyncDriver(config)  # its step() asserts no chunk reaches past a request's last token
    driver.add(make_request("short", varied_prompts(1)[0], max_tokens=2))
    driver.add(make_request("context", varied_prompts(2)[1], max_tokens=None))
    trace = driver.run()
    assert len(trace.tokens["short"]) == 2
    assert len(trace.tokens["context"]) == 16 - len(varied_prompts(2)[1])
    assert trace.finish == {"short": FinishReason.LENGTH, "context": FinishReason.LENGTH}
    assert_all_blocks_free(driver.scheduler)


def test_abort_with_a_step_in_flight() -> None:
    driver = AsyncDriver(CONFIG)
    prompts = varied_prompts(3)
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
    assert_all_blocks_free(driver.scheduler)


def test_preemption_with_a_step_in_flight_resumes_exactly() -> None:
    # 12 blocks of 4 tokens: four requests growing to 27 tokens each cannot all stay.
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=12
    )
    driver = AsyncDriver(config)
    prompts = varied_prompts(4, length=7)
    for index, prompt in enumerate(prompts):
        driver.add(make_request(f"r{index}", prompt, max_tokens=20))
    trace = driver.run()
    assert driver.scheduler.stats().num_preemptions > 0
    for index, prompt in enumerate(prompts):
        assert trace.tokens[f"r{index}"] == reference_generation(prompt, 20)
    assert_all_blocks_free(driver.scheduler)


def test_prefix_hits_under_async_scheduling() -> None:
    driver = AsyncDriver(CONFIG)
    prompts = varied_prompts(3, length=3, shared=12)
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
    assert_all_blocks_free(driver.scheduler)


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
