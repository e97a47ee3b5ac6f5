"""Tests for the token-budget scheduler: budgets, ordering, chunked prefill, prefix sharing,
preemption, stop conditions and aborts. The fake runner really uses the paged KV cache, so wrong
block tables or bad sharing show up as wrong tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest

from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.outputs import FinishReason
from scheduler_harness import Driver, make_request, reference_generation

BLOCK = 4
BASE = SchedulerConfig(
    max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256, block_size=BLOCK, num_blocks=64
)


def config(**changes: object) -> SchedulerConfig:
    return replace(BASE, **changes)  # type: ignore[arg-type]


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return [(seed * 131 + i * 7) % 997 for i in range(length)]


def assert_reference_outputs(
    driver: Driver, max_tokens: dict[str, int], prompts: dict[str, list[int]]
) -> None:
    for request_id, prompt in prompts.items():
        assert driver.trace.tokens[request_id] == reference_generation(prompt, max_tokens[request_id])
        assert driver.trace.finish[request_id] is FinishReason.LENGTH


def test_budget_and_max_num_seqs_hold_under_load() -> None:
    driver = Driver(config(max_num_seqs=3, max_num_batched_tokens=10))
    prompts = {f"r{i}": prompt_of(3 + 5 * i, seed=i) for i in range(8)}
    for request_id, prompt in prompts.items():
        driver.add(make_request(request_id, prompt, max_tokens=6))
    driver.run()  # the driver checks budget, seq cap and ordering on every step
    assert_reference_outputs(driver, dict.fromkeys(prompts, 6), prompts)
    assert max(len(step.chunks) for step in driver.trace.steps) == 3
    assert max(step.num_tokens for step in driver.trace.steps) == 10
    assert driver.scheduler.num_free_blocks == driver.scheduler.num_total_blocks


def test_long_prompt_is_chunked_and_decodes_keep_running() -> None:
    driver = Driver(config(max_num_batched_tokens=8))
    driver.add(make_request("short", prompt_of(3), max_tokens=20))
    driver.step()
    driver.add(make_request("long", prompt_of(30, seed=1), max_tokens=2))
    chunks_of_long = []
    for _ in range(5):
        step = driver.step()
        # Every step: the decode first (one token), then as much of the long prompt as fits.
        assert [c.request_id for c in step.chunks] == ["short", "long"]
        assert len(step.chunks[0].token_ids) == 1
        chunks_of_long.append(step.chunks[1])
    assert [c.start_position for c in chunks_of_long] == [0, 7, 14, 21, 28]
    assert [len(c.token_ids) for c in chunks_of_long] == [7, 7, 7, 7, 2]
    assert [c.sample for c in chunks_of_long] == [False, False, False, False, True]
    assert len(driver.trace.tokens["long"]) == 1 and len(driver.trace.tokens["short"]) == 6
    driver.run()
    assert driver.trace.tokens["long"] == reference_generation(prompt_of(30, seed=1), 2)


def test_admission_is_first_come_first_served() -> None:
    driver = Driver(config(max_num_seqs=2, max_num_batched_tokens=64))
    for i in range(5):
        driver.add(make_request(f"r{i}", prompt_of(5, seed=i), max_tokens=3 + i))
    driver.run()
    admitted = [new.request_id for step in driver.trace.steps for new in step.new_requests]
    assert admitted == ["r0", "r1", "r2", "r3", "r4"]


def test_a_request_short_of_blocks_is_not_overtaken() -> None:
    driver = Driver(config(num_blocks=6, max_num_batched_tokens=64))
    driver.add(make_request("holder", prompt_of(12), max_tokens=8))  # 3 blocks now, up to 5
    driver.step()
    driver.add(make_request("big", prompt_of(16, seed=1), max_tokens=4))  # 4 blocks: only 3 free
    driver.add(make_request("small", prompt_of(2, seed=2), max_tokens=4))  # would fit
    step = driver.step()
    assert [c.request_id for c in step.chunks] == ["holder"]
    assert step.new_requests == ()
    driver.run()
    admitted = [new.request_id for s in driver.trace.steps for new in s.new_requests]
    assert admitted.index("big") < admitted.index("small")


def test_identical_prompt_reuses_cached_blocks_but_computes_the_last_token() -> None:
    driver = Driver(config())
    prompt = prompt_of(10)
    driver.add(make_request("first", prompt, max_tokens=3))
    driver.run()
    driver.add(make_request("second", prompt, max_tokens=3))
    step = driver.step()
    [chunk] = step.chunks
    assert chunk.start_position == 8 and chunk.token_ids == tuple(prompt[8:])
    assert driver.trace.first_outputs["second"].num_cached_tokens == 8
    assert driver.trace.first_outputs["first"].num_cached_tokens == 0
    driver.run()
    assert driver.trace.tokens["second"] == driver.trace.tokens["first"] == reference_generation(prompt, 3)
    stats = driver.scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 8)


def test_block_aligned_prompt_recomputes_its_last_block() -> None:
    driver = Driver(config())
    prompt = prompt_of(8)
    driver.add(make_request("first", prompt, max_tokens=2))
    driver.run()
    driver.add(make_request("second", prompt, max_tokens=2))
    driver.run()
    assert driver.trace.first_outputs["second"].num_cached_tokens == 4
    assert driver.trace.tokens["second"] == reference_generation(prompt, 2)


def test_generated_blocks_are_cached_for_a_follow_up_prompt() -> None:
    driver = Driver(config())
    prompt = prompt_of(6)
    driver.add(make_request("turn1", prompt, max_tokens=7))
    driver.run()
    follow_up = prompt + driver.trace.tokens["turn1"] + [5, 6, 7]  # 16 tokens: 3 cached blocks usable
    driver.add(make_request("turn2", follow_up, max_tokens=2))
    driver.run()
    assert driver.trace.first_outputs["turn2"].num_cached_tokens == 12
    assert driver.trace.tokens["turn2"] == reference_generation(follow_up, 2)


def test_least_recently_released_cached_blocks_are_evicted_first() -> None:
    driver = Driver(config(num_blocks=6))
    prompts = {"a": prompt_of(9, seed=1), "b": prompt_of(9, seed=2), "c": prompt_of(13, seed=3)}
    for request_id, prompt in prompts.items():  # one after another: a's blocks are released first
        driver.add(make_request(request_id, prompt, max_tokens=1))
        driver.run()
    # c needed 4 blocks: the 2 free ones, then a's 2 cached blocks (the oldest); b's survive.
    driver.add(make_request("b-again", prompts["b"], max_tokens=1))
    driver.add(make_request("a-again", prompts["a"], max_tokens=1))
    driver.run()
    assert driver.trace.first_outputs["b-again"].num_cached_tokens == 8
    assert driver.trace.first_outputs["a-again"].num_cached_tokens == 0
    assert driver.trace.tokens["a-again"] == reference_generation(prompts["a"], 1)


def test_preemption_and_resume_give_the_same_tokens() -> None:
    prompts = {f"r{i}": prompt_of(6, seed=i) for i in range(4)}
    max_tokens = {f"r{i}": 14 for i in range(4)}  # up to 19 tokens = 5 blocks each; 4 at once need 20
    driver = Driver(config(num_blocks=10, max_num_batched_tokens=16))
    for request_id, prompt in prompts.items():
        driver.add(make_request(request_id, prompt, max_tokens=14))
    driver.run()
    assert driver.scheduler.stats().num_preemptions > 0
    assert_reference_outputs(driver, max_tokens, prompts)
    resumed = [n for s in driver.trace.steps for n in s.new_requests if n.output_token_ids]
    assert resumed, "a preempted request was never resent with its generated tokens"
    victim = resumed[0].request_id
    dropped_at = next(i for i, s in enumerate(driver.trace.steps) if victim in s.finished_request_ids)
    resent_at = next(i for i, s in enumerate(driver.trace.steps) if resumed[0] in s.new_requests)
    assert dropped_at < resent_at
    assert driver.scheduler.num_free_blocks == driver.scheduler.num_total_blocks


def test_preempted_final_output_only_requests_report_all_their_tokens_once() -> None:
    prompts = {f"r{i}": prompt_of(6, seed=i) for i in range(4)}
    driver = Driver(config(num_blocks=10, max_num_batched_tokens=16))
    for request_id, prompt in prompts.items():
        driver.add(replace(make_request(request_id, prompt, max_tokens=14), final_output_only=True))
    driver.run()
    assert driver.scheduler.stats().num_preemptions > 0
    assert_reference_outputs(driver, {request_id: 14 for request_id in prompts}, prompts)
    # The first output of each request is its last: it finished there, with every token.
    assert all(output.finished for output in driver.trace.first_outputs.values())


def test_the_most_recently_admitted_request_is_preempted() -> None:
    driver = Driver(config(num_blocks=4, max_num_batched_tokens=64))
    driver.add(make_request("old", prompt_of(7), max_tokens=9))  # grows to 15 tokens = all 4 blocks
    driver.add(make_request("new", prompt_of(6, seed=1), max_tokens=6))
    driver.step()  # 2 + 2 blocks: the cache is full
    driver.step()  # both still fit their second block
    step = driver.step()  # old needs a third block: new gives up its two
    assert step.finished_request_ids == {"new"}
    assert [c.request_id for c in step.chunks] == ["old"]
    assert step.new_requests == ()  # no admission in a step that preempted
    assert "new" not in driver.trace.finish and len(driver.trace.tokens["new"]) == 2
    assert driver.scheduler.stats().num_preemptions == 1
    driver.run()
    [resent] = [
        n for s in driver.trace.steps for n in s.new_requests if n.request_id == "new" and n.output_token_ids
    ]
    assert len(resent.output_token_ids) == 2
    assert driver.trace.tokens["old"] == reference_generation(prompt_of(7), 9)
    assert driver.trace.tokens["new"] == reference_generation(prompt_of(6, seed=1), 6)


def test_identical_prompts_arriving_together_compute_the_prompt_once() -> None:
    driver = Driver(config(max_num_batched_tokens=64))
    prompt = prompt_of(10)
    for i in range(3):
        driver.add(make_request(f"n{i}", prompt, max_tokens=4))
    driver.add(make_request("other", prompt_of(5, seed=9), max_tokens=4))
    first = driver.step()
    # The siblings wait for the shared blocks; FCFS keeps 'other' behind them.
    assert [n.request_id for n in first.new_requests] == ["n0"]
    second = driver.step()
    assert [n.request_id for n in second.new_requests] == ["n1", "n2", "other"]
    starts = {c.request_id: c.start_position for c in second.chunks}
    assert (starts["n1"], starts["n2"], starts["other"]) == (8, 8, 0)
    driver.run()
    for i in range(3):
        assert driver.trace.tokens[f"n{i}"] == reference_generation(prompt, 4)
    assert driver.scheduler.stats().prefix_cache_hits == 16


def test_without_prefix_caching_identical_prompts_are_not_deferred() -> None:
    driver = Driver(config(max_num_batched_tokens=64, enable_prefix_caching=False))
    for i in range(3):
        driver.add(make_request(f"n{i}", prompt_of(10), max_tokens=2))
    first = driver.step()
    assert [n.request_id for n in first.new_requests] == ["n0", "n1", "n2"]
    assert all(c.start_position == 0 for c in first.chunks)
    driver.run()
    assert driver.scheduler.stats().prefix_cache_hits == 0


def test_aborting_the_prompt_owner_releases_deferred_siblings() -> None:
    driver = Driver(config(max_num_batched_tokens=4))
    prompt = prompt_of(14)
    driver.add(make_request("owner", prompt, max_tokens=2))
    driver.add(make_request("sibling", prompt, max_tokens=2))
    driver.step()
    driver.step()  # owner has computed 8 tokens; sibling waits for block 2
    assert driver.scheduler.stats().num_waiting == 1
    driver.scheduler.abort_requests(["owner"])
    step = driver.step()
    assert [n.request_id for n in step.new_requests] == ["sibling"]
    assert step.chunks[0].start_position == 8
    driver.run()
    assert driver.trace.tokens["sibling"] == reference_generation(prompt, 2)


@pytest.mark.parametrize(
    ("prompt_len", "changes", "max_tokens"),
    [
        (10, {"max_model_len": 10}, 4),
        (9, {"num_blocks": 2}, 1),
        (4, {"num_blocks": 2, "max_model_len": 64}, None),
        (0, {}, 4),
    ],
)
def test_requests_that_can_never_run_trip_an_assertion(
    prompt_len: int, changes: dict[str, int], max_tokens: int | None
) -> None:
    # The input processor refuses these with a message (tests/test_engine_requests.py); reaching the
    # scheduler they are a caller's bug.
    scheduler = Scheduler(config(**changes))
    with pytest.raises(AssertionError):
        scheduler.add_request(make_request("r", prompt_of(prompt_len), max_tokens=max_tokens))
    assert not scheduler.has_unfinished_requests()


def test_duplicate_request_id_is_rejected() -> None:
    scheduler = Scheduler(config())
    scheduler.add_request(make_request("r", prompt_of(3)))
    with pytest.raises(ValueError, match="'r' is already in use"):
        scheduler.add_request(make_request("r", prompt_of(3)))


def test_invalid_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens must be a positive integer"):
        config(max_num_batched_tokens=0)


def test_stats_count_prompt_and_generated_tokens_across_requests() -> None:
    # Totals kept by the engine itself, so front ends sharing it all report the same figures.
    driver = Driver(config())
    driver.add(make_request("a", prompt_of(5), max_tokens=3))
    driver.add(make_request("b", prompt_of(9, seed=1), max_tokens=4))
    driver.run()
    stats = driver.scheduler.stats()
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (14, 7)


def test_a_prompt_counts_once_when_it_is_first_scheduled() -> None:
    """Not on arrival: a request aborted while it waits was never processed, and a queue filling
    up is no prompt throughput. A preempted request's recomputation does not count it again."""
    driver = Driver(config(max_num_seqs=1))
    driver.add(make_request("a", prompt_of(5), max_tokens=3))
    driver.add(make_request("b", prompt_of(9, seed=1), max_tokens=4))
    assert driver.scheduler.stats().prompt_tokens_total == 0
    driver.step()
    assert driver.scheduler.stats().prompt_tokens_total == 5
    driver.scheduler.abort_requests(["b"])
    driver.run()
    assert driver.scheduler.stats().prompt_tokens_total == 5
