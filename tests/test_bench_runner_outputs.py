"""End to end against the stub server: the saved JSON, plots, sweeps, an interrupted sweep and goodput
(load modes, prompt sources, failures and connections: tests/test_bench_runner_loads.py)."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchlm.bench.plot import latency_panels_ms
from batchlm.bench.runner import main_async, run_benchmark, write_outputs
from bench_stub import FAST, StubServerThread, config_for


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServerThread]:
    with StubServerThread() as server:
        yield server


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
