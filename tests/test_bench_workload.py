"""Workload building: seeded reproducibility, the seed client's ranges, and length overrides."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from batchlm.bench.tokencount import TokenCounter
from batchlm.bench.words import BUILTIN_PROMPTS
from batchlm.bench.workload import Workload, WorkloadConfig, build_workload
from bench_stub import WordCounter

SEED_LIKE = WorkloadConfig(
    dataset_name="builtin",
    dataset_path=None,
    num_requests=200,
    input_len=None,
    output_len=None,
    min_tokens=10,
    max_tokens=512,
    min_delay=0.1,
    max_delay=2.0,
    seed=0,
    prompt_repeat=100,
)


def build(config: WorkloadConfig, counter: TokenCounter | None = None) -> Workload:
    async def get_counter() -> TokenCounter:
        if counter is None:
            raise AssertionError("this workload should not need token counts")
        return counter

    return asyncio.run(build_workload(config, get_counter))


def test_builtin_workload_draws_seed_ranges() -> None:
    specs = build(SEED_LIKE).specs
    assert len(specs) == 200
    assert all(10 <= s.max_tokens <= 512 for s in specs)
    assert all(0.1 <= s.think_time <= 2.0 for s in specs)
    assert {s.prompt for s in specs} <= {" ".join([p] * 100) for p in BUILTIN_PROMPTS}
    assert len({s.max_tokens for s in specs}) > 50  # really drawn, not one fixed value
    assert all(s.prompt_len is None for s in specs)


def test_same_seed_reproduces_the_workload_and_another_seed_changes_it() -> None:
    assert build(SEED_LIKE).specs == build(SEED_LIKE).specs
    assert build(SEED_LIKE).specs != build(dataclasses.replace(SEED_LIKE, seed=1)).specs


def test_changing_think_times_leaves_prompts_and_lengths_alone() -> None:
    base = build(SEED_LIKE).specs
    other = build(dataclasses.replace(SEED_LIKE, min_delay=0.0, max_delay=0.0)).specs
    assert [(s.prompt, s.max_tokens) for s in base] == [(s.prompt, s.max_tokens) for s in other]
    assert all(s.think_time == 0.0 for s in other)


def test_output_len_fixes_every_max_tokens() -> None:
    specs = build(dataclasses.replace(SEED_LIKE, output_len=64)).specs
    assert {s.max_tokens for s in specs} == {64}


def test_random_prompts_are_fitted_to_the_exact_length() -> None:
    counter = WordCounter()
    config = dataclasses.replace(SEED_LIKE, dataset_name="random", input_len=50, num_requests=5)
    workload = build(config, counter)
    assert workload.prompt_length_method == "test words"
    assert all(s.prompt_len == 50 and len(s.prompt.split()) == 50 for s in workload.specs)
    assert counter.calls <= 1 + 5 * 2  # calibration, then at most a correction per prompt


def test_file_prompts_cycle_through_a_shuffle_when_the_run_is_longer(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "max_tokens": 3}\n')
    config = dataclasses.replace(SEED_LIKE, dataset_name="jsonl", dataset_path=str(path), num_requests=7)
    specs = build(config).specs
    prompts = [s.prompt for s in specs]
    assert sorted(prompts[:3]) == ["a", "b", "c"] and sorted(prompts[3:6]) == ["a", "b", "c"]
    assert all(s.max_tokens == 3 for s in specs if s.prompt == "c")


class PieceCounter(TokenCounter):
    """A coarse tokenizer: a BOS token plus one token per 3 characters of every word."""

    method = "pieces"
    exact = True

    async def count(self, text: str) -> int:
        return 1 + sum(-(-len(word) // 3) for word in text.split())


@pytest.mark.parametrize("target", [2, 16, 97])
def test_random_prompts_hit_lengths_that_whole_words_cannot(target: int) -> None:
    config = dataclasses.replace(SEED_LIKE, dataset_name="random", input_len=target, num_requests=6)
    specs = build(config, PieceCounter()).specs
    assert all(s.prompt_len == target for s in specs)
    assert [asyncio.run(PieceCounter().count(s.prompt)) for s in specs] == [target] * 6
