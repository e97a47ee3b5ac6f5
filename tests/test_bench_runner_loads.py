"""End to end against the stub server: load modes, output tokens counted, prompt sources, failures,
warm-ups and warm connections (saved JSON, plots, sweeps and goodput:
tests/test_bench_runner_outputs.py)."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from batchlm.bench import runner
from batchlm.bench.loadgen import LoadConfig, LoadGenerator, arrival_gaps
from batchlm.bench.openai_format import EndpointConfig
from batchlm.bench.records import RequestSpec
from batchlm.bench.report import format_table
from batchlm.bench.runner import SetupError, main_async, run_benchmark
from bench_stub import FAST, StubOptions, StubServerThread, bench, config_for


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServerThread]:
    with StubServerThread() as server:
        yield server


def test_closed_loop_counts_every_token_and_respects_the_user_count(stub: StubServerThread) -> None:
    run = bench(stub.base_url, *FAST, "--requests", "12", "--concurrency", "3", "--max-tokens", "20")
    [level] = run.levels
    m, results = level.metrics, level.outcome.results
    assert (m.completed, m.failed) == (12, 0)
    assert sorted(r.index for r in results) == list(range(12))
    assert m.total_output_tokens == sum(r.spec.max_tokens for r in results)  # the stub always hits max_tokens
    assert all(10 <= r.spec.max_tokens <= 20 for r in results)
    assert m.output_token_sources == {"usage": 12}
    assert 1 <= m.max_concurrent_requests <= 3
    assert m.ttft.count == 12 and m.e2el.count == 12
    assert run.info.num_prompts == 12


@pytest.mark.parametrize("tokenize", [True, False])
def test_without_usage_output_tokens_are_counted_by_tokenize(tokenize: bool) -> None:
    """A server sending 3 tokens a chunk and no usage was credited one token a chunk (3 of 7 tokens);
    its /tokenize now counts the text. Without /tokenize the chunks are still what is counted."""
    with StubServerThread(StubOptions(tokens_per_chunk=3, tokenize=tokenize)) as server:
        argv = (*FAST, "--requests", "4", "--concurrency", "2", "--output-len", "7", "--no-include-usage")
        [level] = bench(server.base_url, *argv).levels
    m = level.metrics
    assert m.completed == 4
    if tokenize:
        assert (m.total_output_tokens, m.output_token_sources) == (4 * 7, {"tokenized": 4})
        assert m.token_itl.count == 4 * (2 + 3)  # 7 spread 2, 2, 3 over the chunks; gaps before 2 and 3
    else:
        assert (m.total_output_tokens, m.output_token_sources) == (4 * 3, {"chunks": 4})


def test_failures_are_counted_apart_from_latencies(stub: StubServerThread, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "fine one", "max_tokens": 4},
        {"prompt": "FAULT:http_500"},
        {"prompt": "FAULT:truncate"},
        "plain string prompt",
        {"prompt": "FAULT:inband_error", "output_len": 6},
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    run = bench(
        stub.base_url, *FAST, "--dataset-name", "jsonl", "--dataset-path", str(prompts), "--requests", "5"
    )
    m = run.levels[0].metrics
    assert (m.completed, m.failed) == (2, 3)
    assert m.ttft.count == 2 and m.e2el.count == 2
    assert set(m.failure_reasons) == {
        "HTTP 500: stub fault: internal error",
        "in-band error: stub fault: engine died",
        next(r for r in m.failure_reasons if r.startswith("truncated stream")),
    }


def test_open_loop_follows_the_seeded_arrival_schedule(stub: StubServerThread) -> None:
    run = bench(
        stub.base_url,
        *FAST,
        "--request-rate",
        "200",
        "--burstiness",
        "0.5",
        "--requests",
        "10",
        "--output-len",
        "3",
        "--seed",
        "7",
    )
    outcome = run.levels[0].outcome
    # The first request at the start, then one gap before each next one (as vLLM sends).
    gaps = itertools.islice(arrival_gaps(200, 0.5, random.Random("7:arrivals")), 9)
    expected = list(itertools.accumulate(gaps, initial=0.0))
    scheduled = sorted(r.scheduled - outcome.run_start for r in outcome.results)
    assert scheduled == pytest.approx(expected, abs=1e-9)
    assert all(r.start >= r.scheduled for r in outcome.results)
    assert run.levels[0].metrics.total_output_tokens == 30


def test_duration_mode_stops_sending_at_the_deadline(stub: StubServerThread) -> None:
    run = bench(
        stub.base_url,
        *FAST,
        "--duration",
        "1",
        "--requests",
        "5",
        "--concurrency",
        "2",
        "--output-len",
        "2",
    )
    outcome = run.levels[0].outcome
    assert len(outcome.results) > 5  # the 5-prompt pool was cycled
    assert all(r.scheduled - outcome.run_start < 1.0 for r in outcome.results)


def test_random_prompts_hit_the_token_length_via_tokenize(stub: StubServerThread) -> None:
    run = bench(stub.base_url, *FAST, "--input-len", "37", "--output-len", "2", "--requests", "4")
    assert run.info.prompt_length_method == "tokenize endpoint"
    results = run.levels[0].outcome.results
    assert all(r.spec.prompt_len == 37 and len(r.spec.prompt.split()) == 37 for r in results)
    assert all(r.usage_prompt_tokens == 37 + 5 for r in results)  # + the stub's chat template
    assert len({r.spec.prompt for r in results}) == 4  # distinct prompts: no accidental prefix sharing


def test_random_prompts_fall_back_to_usage_calibration() -> None:
    with StubServerThread(StubOptions(tokenize=False)) as server:
        run = bench(server.base_url, *FAST, "--input-len", "25", "--output-len", "2", "--requests", "3")
    assert run.info.prompt_length_method == "usage calibration"
    assert all(len(r.spec.prompt.split()) == 25 for r in run.levels[0].outcome.results)
    # BENCHMARKS.md: "the report and the JSON (prompt_length_method) say which was used".
    assert "prompt lengths counted by:" in format_table(run.levels[0], run.info)
    assert format_table(run.levels[0], run.info).count("usage calibration") == 1


def test_sharegpt_prompts_and_reply_lengths(stub: StubServerThread, tmp_path: Path) -> None:
    data = [
        {
            "conversations": [
                {"from": "human", "value": "first question"},
                {"from": "gpt", "value": "one two three"},
            ]
        },
        {
            "conversations": [
                {"from": "gpt", "value": "starts with the model: skipped"},
                {"from": "human", "value": "x"},
            ]
        },
        {"conversations": [{"from": "human", "value": "lonely turn: skipped"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    run = bench(
        stub.base_url, *FAST, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--requests", "2"
    )
    results = run.levels[0].outcome.results
    assert {r.spec.prompt for r in results} == {"first question"}
    assert all(r.spec.max_tokens == 4 for r in results)  # round(3 words * 1.3)


def test_exit_status_is_1_when_every_request_fails(capsys: pytest.CaptureFixture[str]) -> None:
    config = config_for("http://127.0.0.1:9/v1", *FAST, "--requests", "2")
    assert asyncio.run(main_async(config)) == 1
    assert "transport: ClientConnectorError" in capsys.readouterr().out


def test_a_server_that_never_answers_stops_the_run_at_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listening socket that accepts and never answers: without the probe's own limit the client
    # would wait out --request-timeout (600 s by default) before saying anything.
    monkeypatch.setattr(runner, "PROBE_TIMEOUT_S", 0.2)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        base_url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        with pytest.raises(SetupError, match=r"got no answer in 0\.2 s: is a server listening at"):
            bench(base_url, *FAST, "--requests", "2", "--model", "m")


def test_warmups_are_sent_but_not_measured(
    stub: StubServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(stub.base_url, *FAST, "--requests", "3", "--num-warmups", "2", "--output-len", "2")
    run = asyncio.run(run_benchmark(config, echo=True))
    assert "Warm-up: 2/2 requests succeeded" in capsys.readouterr().out
    assert run.levels[0].metrics.completed == 3


def test_each_level_opens_its_connections_before_it_starts() -> None:
    # Every request waits before its first token, so each level's requests are all in flight at once.
    with StubServerThread(StubOptions(ttft_s=0.05)) as server:
        run = bench(server.base_url, *FAST, "--requests", "6", "--concurrency", "2,4", "--output-len", "2")
        assert [level.metrics.completed for level in run.levels] == [6, 6]
        assert [level.outcome.warm_connections for level in run.levels] == [2, 4]
        # No measured request waited for a TCP connect: each went out on a connection opened before.
        assert (server.stats.completions, server.stats.completions_on_new_connections) == (12, 0)


def test_without_warm_connections_a_burst_opens_them_itself() -> None:
    with StubServerThread(StubOptions(ttft_s=0.05)) as server:
        argv = [*FAST, "--requests", "8", "--max-concurrency", "8", "--output-len", "2"]
        run = bench(server.base_url, *argv, "--no-warm-connections")
        [level] = run.levels
        assert (level.metrics.completed, level.outcome.warm_connections) == (8, 0)
        assert server.stats.completions_on_new_connections > 0
        first_burst = server.stats.completions_on_new_connections
        # The same burst with its connections opened first (the default): none of them new.
        run = bench(server.base_url, *argv)
        assert run.levels[0].outcome.warm_connections == 8
        assert server.stats.completions_on_new_connections == first_burst


def test_an_open_loop_without_a_cap_warms_at_most_one_connection_per_request(stub: StubServerThread) -> None:
    run = bench(stub.base_url, *FAST, "--requests", "3", "--request-rate", "inf", "--output-len", "2")
    assert run.levels[0].outcome.warm_connections == 3


class _ClosingModelsHandler(http.server.BaseHTTPRequestHandler):
    """GET /v1/models over HTTP/1.0: every answer closes its connection."""

    def do_GET(self) -> None:
        body = b'{"object": "list", "data": [{"id": "m"}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


def _warm(base_url: str, concurrency: int) -> int:
    async def go() -> int:
        async with aiohttp.ClientSession() as session:
            specs = [RequestSpec(prompt="p", max_tokens=1)] * 8
            endpoint = EndpointConfig(
                url=base_url + "/completions", api="completions", model="m", stream=True
            )
            generator = LoadGenerator(session, endpoint, specs, warm_url=base_url + "/models")
            return await generator.open_connections(LoadConfig(concurrency=concurrency))

    return asyncio.run(go())


def test_warm_connections_count_only_those_the_server_keeps_open(stub: StubServerThread) -> None:
    assert _warm(stub.base_url, 3) == 3
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ClosingModelsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _warm(f"http://127.0.0.1:{server.server_address[1]}/v1", 3) == 0
    finally:
        server.shutdown()
        server.server_close()
