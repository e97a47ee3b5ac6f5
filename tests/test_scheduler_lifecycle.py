"""Scheduler tests for how requests end: stop conditions, aborts (also mid-step), and the runner
contract on sampled tokens. Tokens are fed by hand so each stop condition is hit exactly."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import pytest

from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
from batchlm.outputs import EngineCoreOutput, FinishReason, TokenLogprobs
from scheduler_harness import make_request

EOS = 2
STOP = 7
CONFIG = SchedulerConfig(
    max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, block_size=4, num_blocks=16
)


def feed(scheduler: Scheduler, tokens: dict[str, int]) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    """One step where each sampling request gets the token given for it."""
    scheduled = scheduler.schedule()
    ids = tuple(c.request_id for c in scheduled.chunks if c.sample)
    result = ModelRunnerOutput(ids, tuple(tokens[i] for i in ids), (None,) * len(ids))
    return scheduled, scheduler.update_from_output(scheduled, result)


def run_script(
    tokens: Sequence[int], max_model_len: int = 64, final_output_only: bool = False, **params: object
) -> list[EngineCoreOutput]:
    """Feed one request the scripted tokens until it finishes; returns its outputs."""
    scheduler = Scheduler(replace(CONFIG, max_model_len=max_model_len))
    request = make_request("r", [20, 21, 22], eos=(EOS,), stop_token_ids=[STOP], **params)
    scheduler.add_request(replace(request, final_output_only=final_output_only))
    outputs: list[EngineCoreOutput] = []
    for token in tokens:
        _, step_outputs = feed(scheduler, {"r": token})
        outputs.extend(step_outputs)
        if outputs and outputs[-1].finished:
            assert not scheduler.has_unfinished_requests()
            assert scheduler.num_free_blocks == scheduler.num_total_blocks
            return outputs
    raise AssertionError("the request did not finish on the scripted tokens")


def test_eos_finishes_with_stop() -> None:
    outputs = run_script([5, 6, EOS, 9])
    assert [o.new_token_ids for o in outputs] == [(5,), (6,), (EOS,)]
    assert [o.finish_reason for o in outputs] == [None, None, FinishReason.STOP]
    assert outputs[-1].stop_token_id is None


def test_stop_token_id_finishes_and_is_reported() -> None:
    outputs = run_script([5, STOP, 9])
    assert outputs[-1].finish_reason is FinishReason.STOP and outputs[-1].stop_token_id == STOP


def test_min_tokens_delays_eos_and_stop_tokens() -> None:
    outputs = run_script([EOS, STOP, EOS], min_tokens=2)
    assert len(outputs) == 3 and outputs[-1].finish_reason is FinishReason.STOP


def test_ignore_eos_runs_to_max_tokens() -> None:
    outputs = run_script([EOS] * 5, ignore_eos=True, max_tokens=4)
    assert len(outputs) == 4 and outputs[-1].finish_reason is FinishReason.LENGTH


def test_max_tokens_finishes_with_length() -> None:
    outputs = run_script([5] * 9, max_tokens=3)
    assert [o.finish_reason for o in outputs] == [None, None, FinishReason.LENGTH]


def test_context_limit_finishes_with_length() -> None:
    outputs = run_script([5] * 9, max_model_len=6, max_tokens=None)
    assert len(outputs) == 3 and outputs[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    ("tokens", "params"),
    [
        ([5, 6, EOS, 9], {}),
        ([5, STOP, 9], {}),
        ([EOS, STOP, EOS], {"min_tokens": 2}),
        ([5] * 9, {"max_tokens": 3}),
        ([5] * 9, {"max_model_len": 6, "max_tokens": None}),
        ([5], {"max_tokens": 1}),
    ],
)
def test_final_output_only_reports_every_token_at_once_when_it_finishes(
    tokens: list[int], params: dict[str, object]
) -> None:
    step_by_step = run_script(tokens, **params)  # type: ignore[arg-type]
    before = time.time()
    [final] = run_script(tokens, final_output_only=True, **params)  # type: ignore[arg-type]
    assert final.new_token_ids == tuple(t for o in step_by_step for t in o.new_token_ids)
    last = step_by_step[-1]
    assert (final.finish_reason, final.stop_token_id) == (last.finish_reason, last.stop_token_id)
    if len(tokens) > 1 and len(step_by_step) > 1:
        assert final.first_token_time is not None and before <= final.first_token_time <= time.time()


def test_abort_of_a_final_output_only_request_hands_over_its_tokens() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(replace(make_request("r", [1, 2, 3]), final_output_only=True))
    assert feed(scheduler, {"r": 5})[1] == [] and feed(scheduler, {"r": 6})[1] == []
    [output] = scheduler.abort_requests(["r"])
    assert output == EngineCoreOutput("r", (5, 6), finish_reason=FinishReason.ABORT)


def test_logprobs_ride_along_with_their_token() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(make_request("r", [1, 2, 3], logprobs=0))
    scheduled = scheduler.schedule()
    logprob = TokenLogprobs(logprob=-0.5, rank=1)
    [output] = scheduler.update_from_output(scheduled, ModelRunnerOutput(("r",), (9,), (logprob,)))
    assert output.new_logprobs == (logprob,)


def test_finished_request_is_dropped_from_the_runner_next_step() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(make_request("r", [1, 2, 3], max_tokens=1))
    scheduler.add_request(make_request("s", [1, 2, 4], max_tokens=3))
    feed(scheduler, {"r": 5, "s": 5})
    scheduled, _ = feed(scheduler, {"s": 5})
    assert scheduled.finished_request_ids == {"r"}
    scheduled, _ = feed(scheduler, {"s": 5})
    assert scheduled.finished_request_ids == frozenset()


def test_abort_frees_blocks_at_once_and_tells_the_runner_next_step() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(make_request("r", list(range(10))))
    feed(scheduler, {"r": 5})
    assert scheduler.num_free_blocks == CONFIG.num_blocks - 3
    [output] = scheduler.abort_requests(["r", "unknown"])
    assert output == EngineCoreOutput("r", (), finish_reason=FinishReason.ABORT)
    assert scheduler.num_free_blocks == CONFIG.num_blocks
    assert not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_request_ids == {"r"}
    assert scheduler.abort_requests(["r"]) == []


def test_abort_of_a_waiting_request_never_reaches_the_runner() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(make_request("r", [1, 2, 3]))
    [output] = scheduler.abort_requests(["r"])
    assert output.finish_reason is FinishReason.ABORT
    step = scheduler.schedule()
    assert step.is_empty and step.finished_request_ids == frozenset()


def test_abort_while_the_step_is_in_flight_drops_its_token() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(make_request("gone", [1, 2, 3]))
    scheduler.add_request(make_request("kept", [1, 2, 4]))
    scheduled = scheduler.schedule()
    scheduler.abort_requests(["gone"])
    result = ModelRunnerOutput(("gone", "kept"), (5, 6), (None, None))
    outputs = scheduler.update_from_output(scheduled, result)
    assert [(o.request_id, o.new_token_ids) for o in outputs] == [("kept", (6,))]
    assert scheduler.num_free_blocks == CONFIG.num_blocks - 1
    assert scheduler.schedule().finished_request_ids == {"gone"}


def test_missing_token_from_the_runner_is_an_error() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(make_request("r", [1, 2, 3]))
    scheduled = scheduler.schedule()
    with pytest.raises(RuntimeError, match="returned 0 tokens for 1 sampling chunks"):
        scheduler.update_from_output(scheduled, ModelRunnerOutput((), (), ()))
    with pytest.raises(RuntimeError, match="returned no token for request 'r'"):
        scheduler.update_from_output(scheduled, ModelRunnerOutput(("x",), (5,), (None,)))


def test_stats_snapshot() -> None:
    scheduler = Scheduler(CONFIG)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", list(range(i, i + 5))))
    stats = scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 3, 0.0)
    feed(scheduler, dict.fromkeys(("r0", "r1", "r2"), 9))
    stats = scheduler.stats()
    assert (stats.num_running, stats.num_waiting) == (3, 0)
    assert stats.kv_cache_usage == 6 / 16
    assert stats.prefix_cache_queries == 15
