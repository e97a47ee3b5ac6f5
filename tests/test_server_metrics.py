"""/metrics (per-app Prometheus registry), request timing from engine timestamps, and the log lines."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram

from batchlm.core.facts import EngineStats
from batchlm.outputs import CompletionOutput, FinishReason, RequestMetrics, RequestOutput
from batchlm.server.background import BackgroundServer
from batchlm.server.metrics import (
    LATENCY_BUCKETS,
    RepeatableHistogram,
    RequestRecorder,
    ServerMetrics,
    StatsLogger,
)
from fake_engine import FakeEngine, FakeTokenizer, metric_value, openai_client, wait_until

USER = [{"role": "user", "content": "hi"}]
PROMPT_LEN = len(FakeTokenizer().apply_chat_template(USER))


@pytest.fixture()
def engine() -> FakeEngine:
    return FakeEngine(cached_tokens=4)


@pytest.fixture()
def server(engine: FakeEngine) -> Iterator[BackgroundServer]:
    with BackgroundServer(engine) as running:
        yield running


def scrape(server: BackgroundServer) -> str:
    response = httpx.get(f"{server.base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def test_a_request_is_counted_timed_and_its_tokens_reported(server: BackgroundServer) -> None:
    openai_client(server.base_url).chat.completions.create(model="fake-model", messages=USER, max_tokens=5)
    text = scrape(server)

    def value(name: str, labels: str = "") -> float | None:
        return metric_value(text, name, labels)

    assert value("batchlm_requests_total", 'outcome="length"') == 1
    assert value("batchlm_time_to_first_token_seconds_count") == 1
    assert value("batchlm_inter_token_latency_seconds_count") == 4  # one token per step: 5 tokens, 4 gaps
    assert value("batchlm_e2e_request_latency_seconds_count") == 1
    assert value("batchlm_request_queue_time_seconds_count") == 1
    assert value("batchlm_request_intake_seconds_count") == 1
    assert 0 <= (value("batchlm_request_intake_seconds_sum") or 0) < 5
    assert value("batchlm_prompt_tokens_total") == PROMPT_LEN
    assert value("batchlm_generation_tokens_total") == 5
    assert value("batchlm_prefix_cache_hit_rate") == pytest.approx(4 / PROMPT_LEN)
    assert value("batchlm_num_requests_running") == 0
    assert value("batchlm_num_requests_waiting") == 0
    assert value("batchlm_kv_cache_usage_ratio") == 0
    assert value("batchlm_engine_ready") == 1
    assert value("batchlm_requests_in_flight") == 0


def test_running_requests_show_in_the_gauges() -> None:
    engine = FakeEngine(max_model_len=20_000, token_delay_s=0.01)
    with BackgroundServer(engine) as server:
        body = {"messages": USER, "max_tokens": 10_000, "ignore_eos": True, "stream": True}
        with httpx.stream(
            "POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=30
        ) as response:
            lines = response.iter_lines()  # kept referenced: dropping it would close the stream
            next(lines)
            text = scrape(server)
        assert metric_value(text, "batchlm_num_requests_running") == 1
        assert metric_value(text, "batchlm_kv_cache_usage_ratio") == 0.125
        assert metric_value(text, "batchlm_requests_in_flight") == 1


class DiedWhileBusy(FakeEngine):
    """A dead engine whose last snapshot, from before it died, counted work in progress."""

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=3,
            num_waiting=2,
            kv_cache_usage=0.5,
            prompt_tokens_total=40,
            generation_tokens_total=9,
        )


def test_a_dead_engine_shows_no_running_requests_and_keeps_its_counts() -> None:
    engine = DiedWhileBusy()
    engine.kill()
    text = ServerMetrics(engine).render().decode()
    assert metric_value(text, "batchlm_engine_ready") == 0
    assert metric_value(text, "batchlm_num_requests_running") == 0
    assert metric_value(text, "batchlm_num_requests_waiting") == 0
    assert metric_value(text, "batchlm_kv_cache_usage_ratio") == 0
    assert metric_value(text, "batchlm_prompt_tokens_total") == 40
    assert metric_value(text, "batchlm_generation_tokens_total") == 9


def test_each_app_has_its_own_registry() -> None:
    with BackgroundServer(FakeEngine()) as first, BackgroundServer(FakeEngine()) as second:
        openai_client(first.base_url).completions.create(model="fake-model", prompt="x", max_tokens=2)
        assert metric_value(scrape(first), "batchlm_requests_total", 'outcome="length"') == 1
        assert metric_value(scrape(second), "batchlm_requests_total", 'outcome="length"') is None


def test_histograms_use_the_engine_timestamps() -> None:
    metrics = ServerMetrics(FakeEngine())
    recorder = RequestRecorder(metrics, "r1", prompt_tokens=3, received_at=99.875)
    timing = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.25, first_token_time=100.5)

    def output(text: str, last_token_time: float, finished: bool) -> RequestOutput:
        timing.last_token_time = last_token_time
        timing.finished_time = last_token_time if finished else None
        completion = CompletionOutput(0, text, [5], finish_reason="stop" if finished else None)
        return RequestOutput("r1", None, [1, 2, 3], [completion], finished, metrics=timing)

    recorder.observe(output("a", 100.5, False))
    recorder.observe(output("b", 100.75, False))
    recorder.observe(output("c", 101.5, True))
    recorder.finish("stop")

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert sample("batchlm_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert sample("batchlm_inter_token_latency_seconds_sum") == pytest.approx(0.25 + 0.75)
    assert sample("batchlm_inter_token_latency_seconds_count") == 2
    assert sample("batchlm_request_queue_time_seconds_sum") == pytest.approx(0.25)
    assert sample("batchlm_e2e_request_latency_seconds_sum") == pytest.approx(1.5)
    # Intake: HTTP arrival to engine arrival, observed once per request.
    assert sample("batchlm_request_intake_seconds_sum") == pytest.approx(0.125)
    assert sample("batchlm_request_intake_seconds_count") == 1
    assert recorder.completion_tokens == 3


def test_a_delta_with_every_token_spreads_the_gaps_after_the_first() -> None:
    """A response that is not streamed arrives as one delta holding all its tokens."""
    metrics = ServerMetrics(FakeEngine())
    recorder = RequestRecorder(metrics, "r1", prompt_tokens=3)
    timing = RequestMetrics(arrival_time=100.0, first_token_time=100.5, last_token_time=102.5)
    completion = CompletionOutput(0, "abcde", [5, 6, 7, 8, 9], finish_reason="length")
    recorder.observe(RequestOutput("r1", None, [1, 2, 3], [completion], True, metrics=timing))

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert sample("batchlm_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert sample("batchlm_inter_token_latency_seconds_count") == 4
    assert sample("batchlm_inter_token_latency_seconds_sum") == pytest.approx(2.0)


@pytest.mark.parametrize("gap", [0.0, 0.0005, 0.001, 0.004, 0.1, 0.25, 59.0, 60.0, 61.0])
def test_a_gap_observed_n_times_at_once_records_what_n_observations_do(gap: float) -> None:
    # On a bound (0.001, 0.1, 60.0) the value falls in that bound's bucket, as observe() puts it.
    registry = CollectorRegistry()
    one_at_a_time = Histogram("one", "", buckets=LATENCY_BUCKETS, registry=registry)
    at_once = RepeatableHistogram("at_once", "", buckets=LATENCY_BUCKETS, registry=registry)
    for _ in range(7):
        one_at_a_time.observe(gap)
    at_once.observe_repeated(gap, 7)

    def samples(histogram: Histogram, name: str) -> list[tuple[str, dict[str, str], float]]:
        (family,) = histogram.collect()
        return [
            (s.name.removeprefix(name), s.labels, s.value) for s in family.samples if "_created" not in s.name
        ]

    expected, got = samples(one_at_a_time, "one"), samples(at_once, "at_once")
    assert [(name, labels) for name, labels, _ in got] == [(name, labels) for name, labels, _ in expected]
    assert [value for *_, value in got] == pytest.approx([value for *_, value in expected])


def test_stats_line_reports_throughput_and_stays_silent_when_idle(caplog: Any) -> None:
    engine = FakeEngine(cached_tokens=1)
    stats_logger = StatsLogger(engine, interval_s=5.0)
    assert stats_logger.log_once() is None  # nothing happened yet
    engine._prompt_tokens, engine._generated_tokens = 40, 80
    engine.calls.append(object())  # type: ignore[arg-type]
    engine._active.add("busy")
    with caplog.at_level(logging.INFO, logger="batchlm.server.stats"):
        line = stats_logger.log_once()
    assert line is not None and line in caplog.text
    for part in ("prompt throughput", "generation throughput", "running: 1 reqs", "waiting: 0 reqs"):
        assert part in line
    assert "KV cache usage: 12.5%" in line and "prefix cache hit rate: 2.5%" in line
    engine._active.clear()
    assert stats_logger.log_once() is None  # no new tokens, nothing running


def test_the_first_stats_line_takes_its_rates_over_the_time_since_the_engine_became_ready() -> None:
    now = [0.0]
    engine = FakeEngine(ready=False)
    stats_logger = StatsLogger(engine, interval_s=10.0, clock=lambda: now[0])
    now[0] = 100.0  # a long load, ticked through by the logger
    assert stats_logger.log_once() is None
    engine._ready = True
    engine._prompt_tokens, engine._generated_tokens = 40, 80
    now[0] = 110.0
    line = stats_logger.log_once()
    assert line is not None
    assert "prompt throughput: 4.0 tokens/s" in line and "generation throughput: 8.0 tokens/s" in line


class _SnapshotEngine:
    is_ready = True

    def __init__(self) -> None:
        self.snapshot = EngineStats()

    def stats(self) -> EngineStats:
        return self.snapshot


def test_the_stats_line_reports_the_intervals_drafts() -> None:
    engine = _SnapshotEngine()
    ticks = iter(range(0, 1000, 10))
    stats_logger = StatsLogger(engine, interval_s=10.0, clock=lambda: float(next(ticks)))  # type: ignore[arg-type]
    engine.snapshot = EngineStats(
        generation_tokens_total=50,
        spec_proposed_tokens_total=40,
        spec_accepted_tokens_total=30,
        spec_drafts_total=10,
    )
    line = stats_logger.log_once()
    assert line is not None and line.endswith(
        "drafts: 30 of 40 tokens accepted (75.0%), mean acceptance length 4.00"
    )
    # The next interval: 8 drafted, 2 accepted in 4 drafts; then one without drafts says nothing of them.
    engine.snapshot = replace(
        engine.snapshot,
        generation_tokens_total=60,
        spec_proposed_tokens_total=48,
        spec_accepted_tokens_total=32,
        spec_drafts_total=14,
    )
    line = stats_logger.log_once()
    assert line is not None and line.endswith(
        "drafts: 2 of 8 tokens accepted (25.0%), mean acceptance length 1.50"
    )
    engine.snapshot = replace(engine.snapshot, generation_tokens_total=70)
    line = stats_logger.log_once()
    assert line is not None and "drafts" not in line


def test_one_debug_line_per_request(server: BackgroundServer, caplog: Any) -> None:
    with caplog.at_level(logging.DEBUG, logger="batchlm.server.metrics"):
        response = openai_client(server.base_url).chat.completions.create(
            model="fake-model", messages=USER, max_tokens=3
        )
        wait_until(lambda: response.id in caplog.text, what="the request log line")
    [line] = [r.getMessage() for r in caplog.records if response.id in r.getMessage()]
    assert "length" in line
    assert (
        f"prompt_tokens={PROMPT_LEN}" in line and "completion_tokens=3" in line and "cached_tokens=4" in line
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_batch_counts_its_error_once_and_no_disconnect(stream: bool) -> None:
    """The second prompt of a batch is refused (429): the request is that one error, and its first
    prompt, aborted with it, is no client disconnect."""
    engine = FakeEngine(max_in_flight=1, token_delay_s=0.01)
    with BackgroundServer(engine) as server:
        body = {"model": "fake-model", "prompt": ["a", "b"], "max_tokens": 50, "ignore_eos": True}
        response = httpx.post(
            f"{server.base_url}/v1/completions", json={**body, "stream": stream}, timeout=30
        )
        assert response.status_code == 429
        text = scrape(server)
    assert metric_value(text, "batchlm_requests_total", 'outcome="error_429"') == 1
    assert metric_value(text, "batchlm_requests_total", 'outcome="client_disconnect"') is None
    assert metric_value(text, "batchlm_requests_in_flight") == 0


class SecondPromptFails(FakeEngine):
    """The batch's second prompt fails at its third step; the first one goes on."""

    def _step(self, call: Any, choices: Any, timing: RequestMetrics, step: int) -> RequestOutput:
        if call.request_id.endswith("-1") and step == 2:
            raise RuntimeError("the second prompt failed")
        return super()._step(call, choices, timing, step)


def test_an_error_event_in_a_streamed_batch_counts_no_disconnect() -> None:
    with BackgroundServer(SecondPromptFails(token_delay_s=0.01)) as server:
        body = {"model": "fake-model", "prompt": ["a", "b"], "max_tokens": 50, "ignore_eos": True}
        with httpx.stream(
            "POST", f"{server.base_url}/v1/completions", json={**body, "stream": True}, timeout=30
        ) as response:
            events = list(response.iter_lines())
        assert any('"error"' in line for line in events)
        text = scrape(server)
    assert metric_value(text, "batchlm_requests_total", 'outcome="error_500"') == 1
    assert metric_value(text, "batchlm_requests_total", 'outcome="client_disconnect"') is None
    assert metric_value(text, "batchlm_requests_in_flight") == 0


def test_inter_token_gaps_are_counted_per_completion() -> None:
    """n=2, one token each per step: each completion's gap is the whole step, not half of it."""
    metrics = ServerMetrics(FakeEngine())
    recorder = RequestRecorder(metrics, "r1", prompt_tokens=3)
    timing = RequestMetrics(arrival_time=100.0, first_token_time=100.5)

    def step(at: float, tokens: dict[int, int], finished: bool = False) -> None:
        timing.last_token_time = at
        deltas = [CompletionOutput(i, "x" * k, [7] * k) for i, k in tokens.items()]
        recorder.observe(RequestOutput("r1", None, [1, 2, 3], deltas, finished, metrics=timing))

    step(100.5, {0: 1, 1: 1})
    step(101.5, {0: 1, 1: 1})
    step(102.5, {0: 1, 1: 1})
    step(104.5, {1: 2}, finished=True)  # a lagging delta: two tokens of completion 1

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert sample("batchlm_time_to_first_token_seconds_count") == 1
    assert sample("batchlm_inter_token_latency_seconds_count") == 2 + 4
    assert sample("batchlm_inter_token_latency_seconds_sum") == pytest.approx(2 * 1.0 + 2 * 1.0 + 2.0)
    assert recorder.completion_tokens == 8


class EndsAtTheThirdStep(FakeEngine):
    """Every request ends at its third step with `reason` (ABORT: the server aborted it; ERROR: the
    engine failed it, e.g. its grammar)."""

    def __init__(self, reason: FinishReason, **options: Any) -> None:
        super().__init__(**options)
        self.reason = reason

    def _step(self, call: Any, choices: Any, timing: RequestMetrics, step: int) -> RequestOutput:
        if step < 2:
            return super()._step(call, choices, timing, step)
        for choice in choices:
            choice.finish_reason = self.reason
        deltas = [CompletionOutput(c.index, "", [], finish_reason=self.reason) for c in choices]
        return RequestOutput(call.request_id, call.prompt, call.prompt_token_ids, deltas, True, 0, timing)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("reason", "status"), [(FinishReason.ABORT, 503), (FinishReason.ERROR, 500)])
def test_a_request_ended_in_error_is_counted_as_that_error_only(
    reason: FinishReason, status: int, stream: bool
) -> None:
    with BackgroundServer(EndsAtTheThirdStep(reason)) as server:
        body = {"model": "fake-model", "prompt": "a", "max_tokens": 50, "stream": stream}
        response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30)
        assert response.status_code == (200 if stream else status)
        text = scrape(server)
    outcomes = {
        line.split('"')[1]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("batchlm_requests_total{")
    }
    assert outcomes == {f"error_{status}": 1}
