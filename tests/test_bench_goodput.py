"""--goodput: parsing the objectives, and counting good requests on hand-built request timelines."""

from __future__ import annotations

import pytest

from batchlm.bench.accounting import account_tokens
from batchlm.bench.goodput import count_good, parse_goodput
from batchlm.bench.loadgen import LoadConfig, LoadOutcome
from batchlm.bench.metrics import compute_metrics
from batchlm.bench.records import RequestResult, RequestSpec
from batchlm.bench.report import LevelReport, RunInfo, format_table, result_json
from batchlm.bench.selfcheck import ClientCheck


def timeline(
    start: float, chunks: list[float], end: float, tokens: int, error: str | None = None
) -> RequestResult:
    """A streamed request sent at `start`, its chunks arriving at `chunks`, done at `end`."""
    return RequestResult(
        index=0,
        spec=RequestSpec(prompt="p", max_tokens=tokens),
        start=start,
        end=end,
        chunk_times=chunks,
        chunk_cumulative_tokens=[None] * len(chunks),
        usage_completion_tokens=tokens,
        generated_chars=len(chunks),
        error=error,
    )


def test_objectives_parse_as_milliseconds_by_vllm_metric_name() -> None:
    assert parse_goodput(["ttft:200", "tpot:12.5", "e2el:1e4"], stream=True) == {
        "ttft": 200.0,
        "tpot": 12.5,
        "e2el": 10000.0,
    }
    assert parse_goodput([], stream=False) == {}
    assert parse_goodput(["e2el:500"], stream=False) == {"e2el": 500.0}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["ttft"], "--goodput expects KEY:VALUE (milliseconds), got 'ttft'"),
        (["ttft:"], "--goodput expects KEY:VALUE (milliseconds), got 'ttft:'"),
        (["itl:5"], "--goodput: unknown metric 'itl' in 'itl:5'; use ttft, tpot, e2el"),
        (["ttft:abc"], "--goodput: ttft needs a number of milliseconds, got 'abc'"),
        (["ttft:-1"], "--goodput: ttft must be a finite number of milliseconds > 0, got -1"),
        (["e2el:0"], "--goodput: e2el must be a finite number of milliseconds > 0, got 0"),
        (["e2el:nan"], "--goodput: e2el must be a finite number of milliseconds > 0, got nan"),
        (["e2el:inf"], "--goodput: e2el must be a finite number of milliseconds > 0, got inf"),
        (["ttft:1", "ttft:2"], "--goodput: ttft given more than once"),
    ],
)
def test_bad_objectives_are_refused_naming_the_flag(items: list[str], message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_goodput(items, stream=True)
    assert str(error.value) == message


def test_ttft_and_tpot_objectives_need_streamed_responses() -> None:
    with pytest.raises(
        ValueError, match="--goodput ttft/tpot is measured on streamed responses: add --stream"
    ):
        parse_goodput(["ttft:100", "tpot:5", "e2el:900"], stream=False)


# Times are binary fractions, so that a latency equal to an objective compares exactly.
# TTFT 125 ms, E2EL 625 ms, 5 tokens: TPOT (625 - 125) / 4 = 125 ms.
SLOW_START = timeline(8.0, [8.125, 8.25, 8.375, 8.5, 8.625], 8.625, 5)
# TTFT 31.25 ms, E2EL 1031.25 ms, 3 tokens: TPOT 500 ms.
SLOW_DECODE = timeline(16.0, [16.03125, 16.53125, 17.03125], 17.03125, 3)
# One token: TTFT 62.5 ms, E2EL 62.5 ms, no TPOT.
ONE_TOKEN = timeline(32.0, [32.0625], 32.0625, 1)


def good(results: list[RequestResult], slos: dict[str, float]) -> int:
    successes = [r for r in results if r.ok]
    return count_good(successes, [account_tokens(r) for r in successes], slos)


@pytest.mark.parametrize(
    ("slos", "expected"),
    [
        ({"ttft": 125.0}, 3),  # at the limit counts as met
        ({"ttft": 124.0}, 2),
        ({"ttft": 40.0}, 1),
        ({"tpot": 125.0}, 2),  # the one-token request has no TPOT and meets it
        ({"tpot": 124.0}, 1),
        ({"e2el": 625.0}, 2),
        ({"e2el": 62.0}, 0),
        ({"ttft": 125.0, "tpot": 500.0, "e2el": 1031.25}, 3),
        ({"ttft": 125.0, "tpot": 500.0, "e2el": 1000.0}, 2),  # every objective must hold
        ({"ttft": 70.0, "tpot": 1.0}, 1),
    ],
)
def test_a_request_is_good_when_every_objective_holds(slos: dict[str, float], expected: int) -> None:
    assert good([SLOW_START, SLOW_DECODE, ONE_TOKEN], slos) == expected


def test_goodput_counts_only_successes_over_the_level_duration() -> None:
    failed = timeline(40.0, [40.01], 40.02, 1, error="HTTP 500: boom")
    results = [SLOW_START, SLOW_DECODE, ONE_TOKEN, failed]
    metrics = compute_metrics(
        results, run_start=8.0, duration_s=40.0, percentiles=[50], goodput_slos_ms={"e2el": 1e6}
    )
    assert metrics.completed == 3 and metrics.failed == 1
    assert metrics.request_goodput == pytest.approx(3 / 40.0) == metrics.request_throughput
    strict = compute_metrics(
        results, run_start=8.0, duration_s=40.0, percentiles=[50], goodput_slos_ms={"ttft": 60.0}
    )
    assert strict.request_goodput == pytest.approx(1 / 40.0)
    assert compute_metrics(results, 8.0, 40.0, [50]).request_goodput is None


def _level(slos: dict[str, float] | None) -> LevelReport:
    results = [SLOW_START, SLOW_DECODE, ONE_TOKEN]
    metrics = compute_metrics(results, 8.0, 40.0, [50], slos)
    outcome = LoadOutcome(results=results, run_start=8.0, duration_s=40.0, max_dispatch_delay_s=0.0)
    return LevelReport("concurrency=1", LoadConfig(concurrency=1), outcome, metrics, CHECK)


CHECK = ClientCheck(
    cpu_percent=1.0, cpu_s=0.1, loop_lag_p50_s=0.0, loop_lag_p99_s=0.0, loop_lag_max_s=0.0, lag_samples=1
)
INFO = RunInfo("openai-chat", "m", "http://x/v1", True, "builtin", "dataset", 3)


def test_the_table_and_json_show_goodput_only_when_asked() -> None:
    with_slos = _level({"ttft": 60.0, "e2el": 2000.0})
    table = format_table(with_slos, INFO)
    assert "Request goodput (req/s):" in table and "ttft <= 60 ms, e2el <= 2000 ms" in table
    saved = result_json(with_slos, INFO, detailed=False, metadata={})
    assert saved["request_goodput"] == pytest.approx(1 / 40.0)
    assert saved["goodput"] == {"ttft": 60.0, "e2el": 2000.0}

    without = _level(None)
    assert "goodput" not in format_table(without, INFO).lower()
    saved = result_json(without, INFO, detailed=False, metadata={})
    assert saved["request_goodput"] is None and saved["goodput"] is None
