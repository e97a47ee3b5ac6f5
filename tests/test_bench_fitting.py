"""The default workload fits the served model (built-in prompts cut to its max_model_len from
/v1/models), and a run where most requests fail says so loudly and exits non-zero."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchlm.bench.fitting import TEMPLATE_RESERVE_TOKENS, fit_repeated_prompts, prompt_token_budget
from batchlm.bench.runner import main_async, run_benchmark
from batchlm.bench.words import BUILTIN_PROMPTS
from bench_stub import StubOptions, StubServerThread, WordCounter, bench, config_for

NO_THINKING = ["--stream", "--min-delay", "0", "--max-delay", "0", "--disable-tqdm"]


@pytest.fixture(scope="module")
def small_context() -> Iterator[StubServerThread]:
    with StubServerThread(StubOptions(max_model_len=2048)) as server:
        yield server


def test_each_prompt_keeps_the_most_repeats_that_fit() -> None:
    counter = WordCounter()
    fitted = asyncio.run(fit_repeated_prompts(["one two three", "solo"], 100, budget=10, counter=counter))
    assert [sample.prompt.split() for sample in fitted] == [["one", "two", "three"] * 3, ["solo"] * 10]
    assert counter.calls <= 2 * 8  # a binary search, not a count per repeat
    whole = asyncio.run(fit_repeated_prompts(["short"], 4, budget=10, counter=WordCounter()))
    assert whole[0].prompt == "short short short short"


def test_no_room_for_a_prompt_is_an_error_that_names_the_flag() -> None:
    assert prompt_token_budget(2048, 512) == 2048 - 512 - TEMPLATE_RESERVE_TOKENS
    with pytest.raises(ValueError, match="--max-tokens"):
        prompt_token_budget(512, 512)
    with pytest.raises(ValueError, match="exceeds the 5-token prompt budget"):
        asyncio.run(fit_repeated_prompts(["six words are too many here"], 3, budget=5, counter=WordCounter()))


def test_the_readme_example_fits_a_2048_token_model(
    small_context: StubServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    # `batchlm bench --stream --concurrency 16 --requests 64` with the default 100 prompt repeats and
    # max_tokens up to 512: without fitting, most prompts would exceed the context.
    run = asyncio.run(
        run_benchmark(
            config_for(small_context.base_url, *NO_THINKING, "--concurrency", "16", "--requests", "64")
        )
    )
    m, results = run.levels[0].metrics, run.levels[0].outcome.results
    assert (m.completed, m.failed) == (64, 0)
    assert all(r.usage_prompt_tokens is not None for r in results)
    assert all(r.usage_prompt_tokens + r.spec.max_tokens <= 2048 for r in results)  # type: ignore[operator]
    # Cut to fit, not cut short: the longest prompt sent still uses most of its budget.
    assert max(len(r.spec.prompt.split()) for r in results) > (2048 - 512 - TEMPLATE_RESERVE_TOKENS) // 2
    assert "cut to fit the served model's 2048-token context" in capsys.readouterr().out


def test_a_server_that_lists_no_context_gets_the_prompts_unchanged() -> None:
    with StubServerThread() as server:
        run = bench(
            server.base_url, *NO_THINKING, "--requests", "40", "--concurrency", "8", "--output-len", "2"
        )
    longest_builtin = max(len(prompt.split()) for prompt in BUILTIN_PROMPTS)
    sent = max(len(r.spec.prompt.split()) for r in run.levels[0].outcome.results)
    assert sent == 100 * longest_builtin


def test_an_output_length_beyond_the_context_stops_the_run_before_it_starts(
    small_context: StubServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(small_context.base_url, *NO_THINKING, "--requests", "2", "--output-len", "4000")
    assert asyncio.run(main_async(config)) == 2
    assert "lower --max-tokens (or --output-len)" in capsys.readouterr().err


def run_with_prompts(
    server: StubServerThread, tmp_path: Path, prompts: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "max_tokens": 2}) for p in prompts) + "\n")
    argv = ["--dataset-name", "jsonl", "--dataset-path", str(path), "--requests", str(len(prompts))]
    status = asyncio.run(main_async(config_for(server.base_url, *NO_THINKING, *argv)))
    return status, capsys.readouterr().err


def test_most_requests_failing_is_loud_and_exits_1(
    small_context: StubServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = ["fine", "FAULT:http_500", "FAULT:http_500", "FAULT:inband_error"]
    status, errors = run_with_prompts(small_context, tmp_path, prompts, capsys)
    assert status == 1
    assert "FAILED: 3 of 4 requests" in errors
    assert "2 x HTTP 500: stub fault: internal error" in errors
    assert "1 x in-band error: stub fault: engine died" in errors


def test_a_minority_of_failures_is_reported_but_the_run_succeeds(
    small_context: StubServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, errors = run_with_prompts(
        small_context, tmp_path, ["fine", "also fine", "FAULT:http_500"], capsys
    )
    assert status == 0 and "FAILED" not in errors
