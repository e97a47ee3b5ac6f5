"""Speculative decoding in the scheduler, against a fake runner whose 'model' mostly copies earlier text
and reads every context token back from its paged KV slots: the same tokens with speculation as without
(with rejections, max_tokens, EOS among the drafts, preemption, prefix hits, chunked prefill and async
scheduling), proposals really accepted, rejected drafts rolled back, and no KV block held at the end."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

from batchlm.core.engine_core import EngineCore
from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.core.speculation import SpeculationConfig
from batchlm.core.step_io import (
    PLACEHOLDER_TOKEN_ID,
    AcceptedDrafts,
    ModelRunnerOutput,
    ScheduledChunk,
    SchedulerOutput,
)
from batchlm.outputs import EngineCoreOutput, FinishReason
from scheduler_harness import make_request

VOCAB = 97
BASE = SchedulerConfig(
    max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96, block_size=4, num_blocks=80
)
NGRAM = SpeculationConfig(mode="ngram", num_tokens=4)


def copy_model(context: Sequence[int]) -> int:
    """Next token: what followed the last earlier occurrence of the current token, except at every
    seventh position (a token the text does not predict), so drafts are accepted and rejected."""
    position, last = len(context), context[-1]
    if position % 7 == 0:
        return (last * 5 + position) % VOCAB
    for index in range(len(context) - 2, -1, -1):
        if context[index] == last:
            return context[index + 1]
    return (last + 1) % VOCAB


class CopyRunner:
    """Stores each computed token in its KV slot and rebuilds every chunk's context from the slots,
    so a wrong block table or a stale (rolled back) slot changes the output. Verifies drafts as the
    real runner does: samples every position of a verify chunk and accepts drafts while they match."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.block_size = config.block_size
        self.slots: list[int | None] = [None] * (config.num_blocks * config.block_size)
        self.previous: dict[str, int] = {}
        self.num_verified_rows = 0
        # Request id -> its block table, built from the chunks' appended block ids.
        self.tables: dict[str, list[int]] = {}

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        request_ids: list[str] = []
        sampled: list[int] = []
        accepted: dict[str, AcceptedDrafts] = {}
        for request_id in step.finished_request_ids:
            self.tables.pop(request_id, None)
        for chunk in step.chunks:
            table = self.tables.setdefault(chunk.request_id, [])
            table.extend(chunk.new_block_ids)
            end = chunk.start_position + len(chunk.token_ids)
            assert len(table) >= -(-end // self.block_size), "no KV slot for a token"
            tokens = [
                self.previous[chunk.request_id] if t == PLACEHOLDER_TOKEN_ID else t for t in chunk.token_ids
            ]
            context = [self._read(table, p) for p in range(chunk.start_position)]
            known = len(tokens) - chunk.num_draft_tokens
            for offset, token in enumerate(tokens):
                self.slots[self._slot(table, chunk.start_position + offset)] = token
            if not chunk.sample:
                continue
            context += tokens[:known]
            drafts = tokens[known:]
            count = 0
            while count < len(drafts) and copy_model(context) == drafts[count]:
                context.append(drafts[count])
                count += 1
            self.num_verified_rows += len(drafts)
            if chunk.num_draft_tokens:
                accepted[chunk.request_id] = AcceptedDrafts(tuple(drafts[:count]), (None,) * count)
            request_ids.append(chunk.request_id)
            sampled.append(copy_model(context))
        self.previous = dict(zip(request_ids, sampled, strict=True))
        return ModelRunnerOutput(tuple(request_ids), tuple(sampled), (None,) * len(sampled), accepted)

    def _slot(self, block_ids: Sequence[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _read(self, block_ids: Sequence[int], position: int) -> int:
        token = self.slots[self._slot(block_ids, position)]
        assert token is not None, "attending to a slot never written"
        return token


def reference(prompt: Sequence[int], max_tokens: int, eos: int | None = None) -> list[int]:
    context, out = list(prompt), []
    while len(out) < max_tokens:
        token = copy_model(context)
        context.append(token)
        out.append(token)
        if token == eos:
            break
    return out


def run(
    config: SchedulerConfig,
    prompts: Sequence[Sequence[int]],
    max_tokens: int = 40,
    eos: int | None = None,
    async_steps: bool = False,
) -> tuple[dict[str, list[int]], dict[str, FinishReason], Scheduler, list[SchedulerOutput]]:
    """Drive scheduler + runner to the end (async_steps: one step in flight, as the async engine core)."""
    scheduler, runner = Scheduler(config), CopyRunner(config)
    tokens: dict[str, list[int]] = {}
    finish: dict[str, FinishReason] = {}
    for index, prompt in enumerate(prompts):
        eos_ids = () if eos is None else (eos,)
        scheduler.add_request(make_request(f"r{index}", prompt, max_tokens=max_tokens, eos=eos_ids))
        tokens[f"r{index}"] = []

    def fold(outputs: list[EngineCoreOutput]) -> None:
        for output in outputs:
            assert output.request_id not in finish, "output after the finish"
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finish_reason is not None:
                finish[output.request_id] = output.finish_reason

    steps: list[SchedulerOutput] = []
    in_flight: tuple[SchedulerOutput, ModelRunnerOutput] | None = None
    for _ in range(5000):
        if not scheduler.has_unfinished_requests() and in_flight is None:
            break
        scheduled = scheduler.schedule()
        steps.append(scheduled)
        _check_step(config, scheduled)
        launched = (scheduled, runner.execute(scheduled)) if not scheduled.is_empty else None
        if async_steps:
            previous, in_flight = in_flight, launched
            if previous is not None:
                fold(scheduler.update_from_output(*previous))
        elif launched is not None:
            fold(scheduler.update_from_output(*launched))
    assert scheduler.num_free_blocks == scheduler.num_total_blocks, "KV blocks still held"
    return tokens, finish, scheduler, steps


def _check_step(config: SchedulerConfig, scheduled: SchedulerOutput) -> None:
    assert scheduled.num_tokens <= config.max_num_batched_tokens
    for chunk in scheduled.chunks:
        end = chunk.start_position + len(chunk.token_ids)
        assert end <= config.max_model_len - 1


def _prompts(count: int) -> list[list[int]]:
    # Each prompt repeats a phrase, so the copy model (and the proposer) find earlier occurrences.
    return [[(11 * r + 3 * i) % VOCAB for i in range(9)] * 3 for r in range(count)]


def _verify_chunks(steps: Sequence[SchedulerOutput]) -> list[ScheduledChunk]:
    return [chunk for step in steps for chunk in step.chunks if chunk.num_draft_tokens]


def test_same_tokens_as_without_speculation_with_accepts_and_rejections() -> None:
    prompts = _prompts(3)
    plain, _, _, plain_steps = run(BASE, prompts)
    spec, finish, scheduler, steps = run(replace(BASE, speculation=NGRAM), prompts)
    assert spec == plain == {f"r{i}": reference(p, 40) for i, p in enumerate(prompts)}
    assert set(finish.values()) == {FinishReason.LENGTH}
    stats = scheduler.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_proposed_tokens_total  # some rejected
    assert stats.generation_tokens_total == 3 * 40
    assert len(_verify_chunks(steps)) > 0
    assert len(steps) < len(plain_steps)  # accepted drafts saved steps


def test_max_tokens_is_never_passed_and_drafts_fit_the_limit() -> None:
    prompts = _prompts(2)
    for max_tokens in (1, 2, 3, 5, 11):
        spec, finish, _, steps = run(replace(BASE, speculation=NGRAM), prompts, max_tokens=max_tokens)
        for index, prompt in enumerate(prompts):
            assert spec[f"r{index}"] == reference(prompt, max_tokens)
            assert finish[f"r{index}"] is FinishReason.LENGTH
        for chunk in _verify_chunks(steps):
            # The drafts and the token sampled after them never pass the prompt + max_tokens.
            assert chunk.start_position + len(chunk.token_ids) + 1 <= len(prompts[0]) + max_tokens


def test_eos_among_accepted_drafts_ends_the_request_there() -> None:
    prompts = _prompts(3)
    expected = reference(prompts[1], 40)
    eos = expected[20]
    spec, finish, scheduler, _ = run(replace(BASE, speculation=NGRAM), prompts, eos=eos)
    for index, prompt in enumerate(prompts):
        assert spec[f"r{index}"] == reference(prompt, 40, eos=eos)
    assert finish["r1"] is FinishReason.STOP and spec["r1"][-1] == eos
    assert scheduler.stats().spec_accepted_tokens_total > 0


def test_preemption_and_small_budget_chunked_prefill() -> None:
    # 14 blocks of 4 tokens for four requests growing to 27 + 40 tokens: they preempt each other; a
    # budget of 12 tokens splits every prompt into chunks and caps the drafts.
    config = replace(BASE, num_blocks=40, max_num_batched_tokens=12, speculation=NGRAM)
    prompts = _prompts(4)
    spec, _, scheduler, _ = run(config, prompts)
    assert spec == {f"r{i}": reference(p, 40) for i, p in enumerate(prompts)}
    assert scheduler.stats().num_preemptions > 0
    assert scheduler.stats().spec_accepted_tokens_total > 0


def test_prefix_hits_on_blocks_computed_by_verify_chunks() -> None:
    first = _prompts(1)[0]
    generated = reference(first, 40)
    # The second prompt continues the first with its own output: its blocks were committed by verify
    # chunks (only the accepted part of each).
    second = first + generated[:30]
    config = replace(BASE, speculation=NGRAM)
    scheduler, runner = Scheduler(config), CopyRunner(config)
    scheduler.add_request(make_request("first", first, max_tokens=40))
    outputs: dict[str, list[int]] = {"first": [], "second": []}
    while scheduler.has_unfinished_requests():
        scheduled = scheduler.schedule()
        for output in scheduler.update_from_output(scheduled, runner.execute(scheduled)):
            outputs[output.request_id].extend(output.new_token_ids)
    scheduler.add_request(make_request("second", second, max_tokens=10))
    while scheduler.has_unfinished_requests():
        scheduled = scheduler.schedule()
        for output in scheduler.update_from_output(scheduled, runner.execute(scheduled)):
            outputs[output.request_id].extend(output.new_token_ids)
    assert outputs == {"first": generated, "second": reference(second, 10)}
    assert scheduler.stats().prefix_cache_hits >= 14 * config.block_size


def test_async_scheduling_waits_for_verify_results() -> None:
    prompts = _prompts(3)
    spec, _, scheduler, steps = run(replace(BASE, speculation=NGRAM), prompts, async_steps=True)
    assert spec == {f"r{i}": reference(p, 40) for i, p in enumerate(prompts)}
    assert scheduler.stats().spec_accepted_tokens_total > 0
    # A request with a verify chunk in flight is never in the next step.
    for current, following in itertools.pairwise(steps):
        verifying = {c.request_id for c in current.chunks if c.num_draft_tokens}
        assert not verifying & {c.request_id for c in following.chunks}


def test_auto_mode_speculates_only_in_small_batches() -> None:
    prompts = _prompts(4)
    auto = SpeculationConfig(mode="auto", num_tokens=4, max_batch=2)
    # All four are admitted in the first step and run to the same length: never two or fewer running.
    spec, _, _, steps = run(replace(BASE, max_num_batched_tokens=128, speculation=auto), prompts)
    assert spec == {f"r{i}": reference(p, 40) for i, p in enumerate(prompts)}
    assert not _verify_chunks(steps)
    spec, _, scheduler, steps = run(replace(BASE, speculation=auto), prompts[:2])
    assert _verify_chunks(steps) and scheduler.stats().spec_accepted_tokens_total > 0


def test_off_schedules_no_drafts() -> None:
    _, _, scheduler, steps = run(BASE, _prompts(2))
    assert not _verify_chunks(steps)
    assert scheduler.stats().spec_proposed_tokens_total == 0


class _Launched:
    """A launched step whose output is already known (the copy runner is synchronous)."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self._output = output

    def result(self) -> ModelRunnerOutput:
        return self._output


class _AsyncCopyExecutor:
    """The copy runner behind the async executor interface, recording every scheduled step."""

    def __init__(self, runner: CopyRunner) -> None:
        self.runner = runner
        self.steps: list[SchedulerOutput] = []

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(scheduled)
        return self.runner.execute(scheduled)

    def execute_async(self, scheduled: SchedulerOutput) -> _Launched:
        return _Launched(self.execute(scheduled))


def test_async_engine_core_waits_for_the_step_in_flight_instead_of_sitting_requests_out() -> None:
    config, prompts = replace(BASE, speculation=NGRAM), _prompts(3)
    scheduler = Scheduler(config)
    executor = _AsyncCopyExecutor(CopyRunner(config))
    core = EngineCore(scheduler, executor, async_scheduling=True)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for index, prompt in enumerate(prompts):
        core.add_request(make_request(f"r{index}", prompt, max_tokens=40))
    while core.has_work():
        for output in core.step():
            tokens[output.request_id].extend(output.new_token_ids)
    assert tokens == {f"r{i}": reference(p, 40) for i, p in enumerate(prompts)}
    # A request verified in one step is in the next one too, unless it finished: it waited for nothing
    # (without the wait for the step in flight it would sit that step out, as in the harness's async run).
    steps = executor.steps
    for index, step in enumerate(steps[:-1]):
        later = [{c.request_id for c in s.chunks} for s in steps[index + 1 :]]
        for chunk in step.chunks:
            if chunk.num_draft_tokens:
                assert chunk.request_id in later[0] or not any(chunk.request_id in ids for ids in later)
    assert _verify_chunks(steps)
    _, _, _, harness_steps = run(config, prompts, async_steps=True)
    assert len(executor.steps) < len([s for s in harness_steps if not s.is_empty])


def test_the_pool_drafts_what_a_finished_request_said() -> None:
    """The same prompt twice, one after the other: the copy model's continuation of these distinct
    tokens is mostly not predictable from the request's own tokens, but the second request can draft
    it from the first one's, and its tokens stay those of plain decoding."""
    one_at_a_time = replace(BASE, max_num_seqs=1)
    prompts = [list(range(10, 30))] * 2
    plain, _, _, _ = run(one_at_a_time, prompts)
    alone, _, alone_scheduler, _ = run(replace(one_at_a_time, speculation=NGRAM), prompts)
    pooled = replace(one_at_a_time, speculation=replace(NGRAM, pool_tokens=1000))
    spec, _, scheduler, steps = run(pooled, prompts)
    assert spec == alone == plain
    accepted = scheduler.stats().spec_accepted_tokens_total
    assert accepted >= alone_scheduler.stats().spec_accepted_tokens_total + 10
    assert any(chunk.request_id == "r1" for chunk in _verify_chunks(steps))
