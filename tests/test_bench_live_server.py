"""`batchlm bench` against a real `batchlm serve` subprocess with a tiny random-weight model. A server
that exits or does not become healthy within 120 s fails the tests, with its log's tail."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchlm.bench import cli
from batchlm.bench.config import from_args
from batchlm.bench.runner import BenchRun, run_benchmark
from fake_engine import free_port

pytestmark = pytest.mark.slow
HEALTHY_WITHIN_S = 120.0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-1500:] if path.exists() else ""


# The seed client's users wait between requests (a think time) unless told not to.
NO_THINK_TIME = ["--min-delay", "0", "--max-delay", "0"]


@pytest.fixture(scope="module")
def live_server(
    tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Base URL (with /v1) of a running `batchlm serve` on the tiny llama model."""
    model_dir = tiny_model_dir("llama")
    port = free_port()
    log = tmp_path_factory.mktemp("live-server") / "server.log"
    command = [sys.executable, "-m", "batchlm.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if process.poll() is not None:
                pytest.fail(f"`batchlm serve` exited with {process.returncode}: {_log_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"`batchlm serve` not healthy within {HEALTHY_WITHIN_S:.0f} s: {_log_tail(log)}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def bench(base_url: str, *argv: str) -> BenchRun:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    config = from_args(
        parser.parse_args(["--base-url", base_url, "--model", "auto", "--disable-tqdm", *argv])
    )
    return asyncio.run(run_benchmark(config, echo=False))


def test_seed_style_streaming_run_succeeds_with_server_usage(live_server: str) -> None:
    run = bench(
        live_server,
        "--stream",
        "--requests",
        "6",
        "--concurrency",
        "3",
        *NO_THINK_TIME,
        "--min-tokens",
        "4",
        "--max-tokens",
        "8",
        "--prompt-repeat",
        "1",
        "--num-warmups",
        "1",
    )
    m = run.levels[0].metrics
    assert (m.completed, m.failed) == (6, 0), m.failure_reasons
    assert m.output_token_sources == {"usage": 6}
    assert 6 <= m.total_output_tokens <= 6 * 8
    assert m.ttft.count == 6 and m.total_input_tokens > 0


def test_fixed_lengths_use_tokenize_and_ignore_eos(live_server: str) -> None:
    run = bench(
        live_server,
        "--stream",
        "--input-len",
        "16",
        "--output-len",
        "5",
        "--requests",
        "4",
        "--max-concurrency",
        "2",
        "--backend",
        "openai",
    )
    assert run.info.prompt_length_method == "tokenize endpoint"
    m = run.levels[0].metrics
    assert (m.completed, m.failed) == (4, 0), m.failure_reasons
    assert m.total_output_tokens == 4 * 5  # ignore_eos: every request runs to max_tokens
    assert all(r.spec.prompt_len == 16 for r in run.levels[0].outcome.results)


def test_non_streaming_run_counts_tokens_from_usage(live_server: str) -> None:
    run = bench(
        live_server,
        "--requests",
        "3",
        *NO_THINK_TIME,
        "--output-len",
        "3",
        "--prompt-repeat",
        "1",
    )
    m = run.levels[0].metrics
    assert (m.completed, m.total_output_tokens, m.ttft.empty) == (3, 9, True), m.failure_reasons


def test_two_client_processes_send_the_whole_workload_once(live_server: str) -> None:
    run = bench(
        live_server,
        "--stream",
        "--input-len",
        "16",
        "--output-len",
        "5",
        "--requests",
        "12",
        "--max-concurrency",
        "6",
        "--backend",
        "openai",
        "--client-processes",
        "2",
    )
    level = run.levels[0]
    m = level.metrics
    assert (m.completed, m.failed) == (12, 0), m.failure_reasons
    assert m.total_output_tokens == 12 * 5
    # Re-numbered into the workload's order: every request exactly once.
    assert sorted(r.index for r in level.outcome.results) == list(range(12))
    assert level.check.lag_samples > 0 and level.check.cpu_s > 0
    # Each process opened its share of the in-flight cap (3 of 6) before the common start.
    assert level.outcome.warm_connections == 6


def test_more_client_processes_than_users_still_send_every_request(live_server: str) -> None:
    """One user over two processes: the level runs from one process with the whole workload (the
    second process, without a user, took every other request and sent none of them)."""
    run = bench(
        live_server,
        "--requests",
        "4",
        "--concurrency",
        "1",
        *NO_THINK_TIME,
        "--output-len",
        "3",
        "--prompt-repeat",
        "1",
        "--client-processes",
        "2",
    )
    level = run.levels[0]
    assert (level.metrics.completed, level.metrics.failed) == (4, 0), level.metrics.failure_reasons
    assert sorted(r.index for r in level.outcome.results) == [0, 1, 2, 3]


def test_editing_dataset_reports_the_servers_draft_acceptance(live_server: str) -> None:
    run = bench(
        live_server,
        "--dataset-name",
        "editing",
        "--requests",
        "2",
        "--concurrency",
        "1",
        "--output-len",
        "48",
    )
    level = run.levels[0]
    assert level.metrics.completed == 2, level.metrics.failure_reasons
    # The server (speculative "auto" by default, one request at a time) verified drafts.
    assert level.spec is not None
    assert level.spec.proposed > 0 and 0 <= level.spec.accepted <= level.spec.proposed


@pytest.mark.parametrize("stream", [True, False])
def test_a_responses_run_counts_tokens_from_its_usage(live_server: str, stream: bool) -> None:
    run = bench(
        live_server,
        *(["--stream"] if stream else []),
        "--backend",
        "openai-responses",
        "--input-len",
        "16",
        "--output-len",
        "5",
        "--requests",
        "4",
        "--max-concurrency",
        "2",
    )
    assert run.info.backend == "openai-responses"
    m = run.levels[0].metrics
    assert (m.completed, m.failed) == (4, 0), m.failure_reasons
    assert m.total_output_tokens == 4 * 5 and m.output_token_sources == {"usage": 4}
    assert m.ttft.empty is not stream
