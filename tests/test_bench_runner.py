"""End to end against the stub server: load modes, prompt sources, failures, saved JSON, plots, sweeps."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import random
import socket
import statistics
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchlm.bench import runner
from batchlm.bench.loadgen import LoadConfig, LoadGenerator, arrival_gaps
from batchlm.bench.openai_format import EndpointConfig
from batchlm.bench.plot import latency_panels_ms
from batchlm.bench.records import RequestSpec
from batchlm.bench.report import format_table
from batchlm.bench.runner import SetupError, main_async, run_benchmark, write_outputs
from bench_stub import StubOptions, StubServerThread, bench, config_for

FAST = ["--stream", "--min-delay", "0", "--max-delay", "0", "--prompt-repeat", "1", "--disable-tqdm"]


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


def test_saved_json_uses_vllm_keys_and_plot_is_written(stub: StubServerThread, tmp_path: Path) -> None:
    out, png = tmp_path / "result.json", tmp_path / "run.png"
    config = config_for(
        stub.base_url,
        *FAST,
        "--requests",
        "6",
        "--concurrency",
        "2",
        "--max-tokens",
        "12",
        "--save-result",
        str(out),
        "--save-detailed",
        "--plot",
        str(png),
        "--metadata",
        "gpu=none",
    )
    run = asyncio.run(run_benchmark(config, echo=False))
    write_outputs(config, run)
    saved = json.loads(out.read_text())
    for key in (
        "date",
        "backend",
        "model_id",
        "num_prompts",
        "request_rate",
        "burstiness",
        "max_concurrency",
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
        "mean_ttft_ms",
        "median_ttft_ms",
        "std_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "p90_itl_ms",
        "p50_e2el_ms",
        "mean_token_itl_ms",
        "input_lens",
        "output_lens",
        "ttfts",
        "itls",
        "errors",
        "output_token_sources",
        "client_cpu_percent",
        "client_loop_lag_p99_ms",
    ):
        assert key in saved, key
    assert (saved["completed"], saved["request_rate"], saved["max_concurrency"], saved["gpu"]) == (
        6,
        "inf",
        2,
        "none",
    )
    assert saved["total_output_tokens"] == sum(saved["output_lens"])
    assert png.stat().st_size > 10_000
    # The chart's median lines are the report's medians (the mean of the middle two of an even count).
    for title, values, median in latency_panels_ms(run.levels[0]):
        assert len(values) >= 6 and median == pytest.approx(statistics.median(values)), title


def test_sweep_gives_one_table_one_json_list_and_one_chart(
    stub: StubServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    config = config_for(
        stub.base_url,
        *FAST,
        "--requests",
        "4",
        "--concurrency",
        "1,2",
        "--output-len",
        "3",
        "--save-result",
        str(out),
        "--plot",
        str(png),
        "--model",
        "auto",
    )
    assert asyncio.run(main_async(config)) == 0
    printed = capsys.readouterr().out
    assert "Sweep summary" in printed and "concurrency=1" in printed and "concurrency=2" in printed
    assert "goodput" not in printed.lower()  # only with --goodput
    saved = json.loads(out.read_text())
    assert [entry["concurrency"] for entry in saved] == [1, 2]
    assert all(entry["model_id"] == "stub-model" for entry in saved)
    assert png.stat().st_size > 10_000


def test_an_interrupted_sweep_reports_and_saves_the_levels_it_finished(
    stub: StubServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import batchlm.bench.runner as runner

    real_run_level = runner._run_level
    calls = 0

    async def interrupted_second_level(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise asyncio.CancelledError  # what Ctrl-C does to the running task
        return await real_run_level(*args, **kwargs)

    monkeypatch.setattr(runner, "_run_level", interrupted_second_level)
    out = tmp_path / "sweep.json"
    argv = [
        *FAST,
        "--requests",
        "3",
        "--concurrency",
        "1,2,4",
        "--output-len",
        "2",
        "--save-result",
        str(out),
    ]
    config = config_for(stub.base_url, *argv)
    assert asyncio.run(main_async(config)) == 130
    captured = capsys.readouterr()
    assert "interrupted; reporting the 1 finished level(s) of 3" in captured.err
    assert "Sweep summary" in captured.out and "concurrency=1" in captured.out
    [saved] = json.loads(out.read_text())  # a sweep's list, of the one level
    assert saved["concurrency"] == 1 and saved["completed"] == 3
    # Interrupted before any level finished: nothing is written, and the interruption goes on up.
    calls = 1
    out.unlink()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main_async(config_for(stub.base_url, *argv)))
    assert not out.exists()


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


def test_goodput_is_saved_per_level_and_an_impossible_objective_gives_zero(
    stub: StubServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A sweep sent from two client processes: each level counts its own good requests.
    out = tmp_path / "sweep.json"
    argv = [*FAST, "--requests", "4", "--concurrency", "1,2", "--output-len", "3", "--client-processes", "2"]
    config = config_for(stub.base_url, *argv, "--goodput", "ttft:0.000001", "--save-result", str(out))
    assert asyncio.run(main_async(config)) == 0
    printed = capsys.readouterr().out
    assert printed.count("Request goodput (req/s):") == 2
    sweep_header = next(line for line in printed.splitlines() if line.lstrip().startswith("level"))
    assert "goodput" in sweep_header.split()
    saved = json.loads(out.read_text())
    assert [(entry["completed"], entry["request_goodput"]) for entry in saved] == [(4, 0.0), (4, 0.0)]
    assert all(entry["goodput"] == {"ttft": 0.000001} for entry in saved)

    # Every success ends within --request-timeout (600 s), so it meets this objective.
    single = tmp_path / "single.json"
    config = config_for(
        stub.base_url,
        *FAST,
        "--requests",
        "3",
        "--output-len",
        "2",
        "--goodput",
        "e2el:600000",
        "--save-result",
        str(single),
    )
    assert asyncio.run(main_async(config)) == 0
    saved = json.loads(single.read_text())
    assert isinstance(saved["request_goodput"], float) and saved["request_goodput"] > 0
    assert saved["request_goodput"] == saved["request_throughput"]
    assert saved["goodput"] == {"e2el": 600000.0}
