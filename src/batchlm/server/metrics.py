"""Prometheus metrics for /metrics, kept in a per-app registry: request outcomes and latency histograms
recorded here, engine gauges and token counters read from EngineClient.stats() at scrape time; and the
periodic engine log line (StatsLogger) from the same stats."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from batchlm.engine.client import EngineClient, EngineStats
from batchlm.outputs import RequestOutput

logger = logging.getLogger(__name__)
stats_log = logging.getLogger("batchlm.server.stats")

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
# (metric, help, EngineStats field): the engine's gauges and counters, read at scrape time.
ENGINE_GAUGES = (
    ("batchlm_num_requests_running", "Requests in the running batch.", "num_running"),
    ("batchlm_num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
    ("batchlm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1).", "kv_cache_usage"),
)
ENGINE_COUNTERS = (
    ("batchlm_prompt_tokens", "Prompt tokens processed.", "prompt_tokens_total"),
    ("batchlm_generation_tokens", "Tokens generated.", "generation_tokens_total"),
    ("batchlm_spec_proposed_tokens", "Draft tokens verified by speculative decoding.",
     "spec_proposed_tokens_total"),
    ("batchlm_spec_accepted_tokens", "Draft tokens accepted by speculative decoding.",
     "spec_accepted_tokens_total"),
    ("batchlm_spec_drafts", "Drafts verified by speculative decoding (a request's draft tokens in one step; "
     "accepted tokens / drafts + 1 is the mean tokens a draft's step gives).", "spec_drafts_total"),
    ("batchlm_prefix_cache_queries", "Tokens looked up in the prefix cache (prompts, and a preempted request's tokens recomputed).", "prefix_cache_queries"),
    ("batchlm_prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    ("batchlm_num_preemptions", "Requests preempted for lack of KV blocks.", "num_preemptions"),
)  # fmt: skip


# prometheus_client's switch for metrics shared by several processes (files in this directory).
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_metrics_between_processes(directory: str) -> None:
    """Make the metrics created from now on in this process, and in processes it starts later, add
    up across processes (several API servers behind one port, each scraped at random, must all report
    the same totals). prometheus_client reads the variable when it is imported, which has happened
    by now, so its value class is picked again."""
    os.environ[MULTIPROCESS_DIR_ENV] = directory
    values.ValueClass = values.get_value_class()


def prefix_cache_hit_rate(stats: EngineStats) -> float:
    """Prefix-cache hits over lookups since start, in tokens (0 before any lookup)."""
    return stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0


class EngineStatsCollector:
    """Reads the engine's snapshot on every scrape, so gauges are never stale and counters never drift.
    With `marks` (several processes serving), each counter is the highest any process has reported."""

    def __init__(self, engine: EngineClient, marks: SharedCounterMarks | None = None) -> None:
        self._engine = engine
        self._marks = marks

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("batchlm_engine_ready", "1 when the engine serves requests.", self._ready())
        try:
            stats = self._engine.stats()
        except Exception:  # a loading or dead engine has no stats; the other metrics still matter
            logger.debug("engine stats unavailable", exc_info=True)
            return
        if self._engine.is_dead:
            # Its last snapshot still counts the requests it held then; a dead engine holds none.
            stats = replace(stats, num_running=0, num_waiting=0, kv_cache_usage=0.0)
        for name, doc, stat in ENGINE_GAUGES:
            yield GaugeMetricFamily(name, doc, value=getattr(stats, stat))
        yield GaugeMetricFamily(
            "batchlm_prefix_cache_hit_rate",
            "Prefix-cache hits over lookups, in tokens (0..1).",
            value=prefix_cache_hit_rate(stats),
        )
        if stats.kv_cache_blocks:
            blocks = GaugeMetricFamily(
                "batchlm_kv_cache_blocks", "KV-cache blocks allocated, by bits per element.", labels=["bits"]
            )
            blocks.add_metric([str(stats.kv_cache_bits)], stats.kv_cache_blocks)
            yield blocks
        counters = {stat: float(getattr(stats, stat)) for _, _, stat in ENGINE_COUNTERS}
        if self._marks is not None:
            counters = self._marks.highest(counters)
        for name, doc, stat in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=counters[stat])

    def _ready(self) -> float:
        return 1.0 if self._engine.is_ready and not self._engine.is_dead else 0.0


# The engine counters' highest values reported so far, by EngineStats field: kept in the shared
# directory, read by every process, and left out of what /metrics shows.
COUNTER_MARKS = "batchlm_engine_counter_marks"


class SharedCounterMarks:
    """Each process's snapshot of the engine's counters lags the core by its own few milliseconds, so
    consecutive scrapes answered by different processes could see a counter go down: Prometheus takes
    that for a reset and rate() jumps by the counter's whole value. Every process records what it
    reports in a gauge the processes share (its highest wins), and reports that highest value."""

    def __init__(self, directory: str) -> None:
        self._directory = Path(directory)
        # Created in multiprocess mode (the caller runs after share_metrics_between_processes).
        self._gauge = Gauge(
            COUNTER_MARKS, "Engine counters as reported.", ["stat"], registry=None, multiprocess_mode="max"
        )

    def highest(self, counters: dict[str, float]) -> dict[str, float]:
        """Record this process's values, then return each counter's highest over all processes."""
        for stat, value in counters.items():
            self._gauge.labels(stat=stat).set(value)
        highest = dict(counters)
        for metric in merge_shared(self._directory, "gauge_max_*.db"):
            if metric.name != COUNTER_MARKS:
                continue
            for sample in metric.samples:
                name = sample.labels.get("stat")
                if name is not None and name in highest:
                    highest[name] = max(highest[name], sample.value)
        return highest


class SharedMetricsCollector:
    """prometheus_client's multiprocess merge over the processes' files (merge_shared), less the
    counter marks (SharedCounterMarks), which the engine's counters report."""

    def __init__(self, directory: str) -> None:
        self._directory = Path(directory)

    def collect(self) -> Iterable[Metric]:
        return [metric for metric in merge_shared(self._directory) if metric.name != COUNTER_MARKS]


def merge_shared(directory: Path, pattern: str = "*.db") -> list[Metric]:
    """The metrics of the processes' files matching `pattern`, merged, skipping a file another
    process is creating this instant (still empty: the library's own collector fails the whole scrape
    on it) and retrying once when a file disappears under it (an exited process's gauges removed)."""
    for attempt in range(2):
        files = [str(path) for path in directory.glob(pattern) if _size(path) >= 8]
        try:
            merged: list[Metric] = multiprocess.MultiProcessCollector.merge(files, accumulate=True)
            return merged
        except FileNotFoundError:
            if attempt:
                raise
    return []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class RepeatableHistogram(Histogram):
    """A Histogram that records one value several times in one call: a delta of N tokens holds N equal
    inter-token gaps, and N observe() calls a delta were a visible share of the front end's CPU."""

    def observe_repeated(self, amount: float, count: int) -> None:
        """What `count` observe(amount) calls record (prometheus_client keeps one count per bucket,
        not cumulative ones: only the first bound >= amount counts it). For a histogram without labels."""
        self._sum.inc(amount * count)
        self._buckets[bisect_left(self._upper_bounds, amount)].inc(count)


class ServerMetrics:
    """All metrics of one app. Outcomes: a finish reason ("stop", "length") or "client_disconnect" for
    each engine request (each prompt of a batch), or "error_<status>" once for each error response or
    streaming error event (a request the server aborts at shutdown is an "error_503")."""

    def __init__(self, engine: EngineClient) -> None:
        self.registry = CollectorRegistry()
        # Set when several processes serve (share_metrics_between_processes): a scrape then sums the
        # request metrics of all of them; the engine's own figures are the same in each.
        self._shared_dir = os.environ.get(MULTIPROCESS_DIR_ENV)
        marks = None if self._shared_dir is None else SharedCounterMarks(self._shared_dir)
        self._engine_stats = EngineStatsCollector(engine, marks)
        reg = self.registry
        self.requests = Counter("batchlm_requests", "Requests by outcome.", ["outcome"], registry=reg)
        self.in_flight = Gauge(
            "batchlm_requests_in_flight",
            "Generation requests being served.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.ttft = self._histogram(
            "batchlm_time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS
        )
        self.itl = self._histogram(
            "batchlm_inter_token_latency_seconds", "Time between a completion's tokens.", LATENCY_BUCKETS
        )
        self.e2e = self._histogram("batchlm_e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        self.queue_time = self._histogram(
            "batchlm_request_queue_time_seconds", "Arrival to first scheduled.", E2E_BUCKETS
        )
        self.intake = self._histogram(
            "batchlm_request_intake_seconds",
            "HTTP arrival to arrival at the engine (body, validation, tokenization, hand-off).",
            LATENCY_BUCKETS,
        )
        reg.register(self._engine_stats)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> RepeatableHistogram:
        return RepeatableHistogram(name, doc, buckets=buckets, registry=self.registry)

    def count_outcome(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def count_error(self, status: int) -> None:
        self.count_outcome(f"error_{status}")

    def render(self) -> bytes:
        if self._shared_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        registry.register(SharedMetricsCollector(self._shared_dir))
        registry.register(self._engine_stats)
        return generate_latest(registry)


class RequestRecorder:
    """Timing of one engine request, fed every RequestOutput. Uses the engine's timestamps
    (RequestOutput.metrics) and falls back on the server's clock where the engine gives none."""

    def __init__(
        self,
        metrics: ServerMetrics,
        request_id: str,
        prompt_tokens: int,
        received_at: float | None = None,
        trace_id: str | None = None,
    ) -> None:
        self._metrics = metrics
        # The HTTP request's X-Request-Id, so that its log line can be found by the id the client saw.
        self.trace_id = trace_id
        # When the HTTP request reached the server (None: unknown); intake is measured from it.
        self._received_at = received_at
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._arrival = time.time()
        self._first_token: float | None = None
        # Each completion's last token time, by index: the gaps of n > 1 completions are each one's own.
        self._last_token: dict[int, float] = {}
        self._first_scheduled: float | None = None
        self._finished_at: float | None = None

    def observe(self, output: RequestOutput) -> None:
        new_tokens = sum(len(c.token_ids) for c in output.outputs)
        self.cached_tokens = max(self.cached_tokens, output.num_cached_tokens)
        timing = output.metrics
        if timing is not None:
            self._arrival = timing.arrival_time
            if self._received_at is not None:
                self._metrics.intake.observe(max(0.0, timing.arrival_time - self._received_at))
                self._received_at = None
            self._first_scheduled = timing.first_scheduled_time or self._first_scheduled
            self._finished_at = timing.finished_time or self._finished_at
        if new_tokens == 0:
            return
        now = (timing.last_token_time if timing else None) or time.time()
        if self._first_token is None:
            self._first_token = (timing.first_token_time if timing else None) or now
            self._metrics.ttft.observe(max(0.0, self._first_token - self._arrival))
        # A delta can carry several tokens of a completion (a lagging stream's merged deltas, or the
        # whole of a response that is not streamed): their gaps are spread evenly over the time they
        # took, from the request's first token for a completion's first delta.
        for completion in output.outputs:
            if count := len(completion.token_ids):
                last = self._last_token.get(completion.index)
                if last is None:
                    self._observe_gaps(now - self._first_token, count - 1)
                else:
                    self._observe_gaps(now - last, count)
                self._last_token[completion.index] = now
        self.completion_tokens += new_tokens

    def _observe_gaps(self, span: float, count: int) -> None:
        if count > 0:
            self._metrics.itl.observe_repeated(max(0.0, span) / count, count)

    def finish(self, outcome: str) -> None:
        """Count the outcome, observe end-to-end and queue time, and log the request at DEBUG."""
        finished = self._finished_at or time.time()
        latency = max(0.0, finished - self._arrival)
        self._metrics.count_outcome(outcome)
        self._metrics.e2e.observe(latency)
        if self._first_scheduled is not None:
            self._metrics.queue_time.observe(max(0.0, self._first_scheduled - self._arrival))
        ttft = None if self._first_token is None else self._first_token - self._arrival
        logger.debug(
            "request %s: %s, prompt_tokens=%d completion_tokens=%d cached_tokens=%d latency=%.3fs ttft=%s%s",
            self.request_id,
            outcome,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            latency,
            "-" if ttft is None else f"{ttft:.3f}s",
            "" if self.trace_id is None else f" x_request_id={self.trace_id}",
        )


class StatsLogger:
    """Writes one INFO line per interval while the engine has work or produced tokens; silent when idle."""

    def __init__(
        self, engine: EngineClient, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._clock = clock
        self._last: EngineStats | None = None
        self._last_time = clock()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                self.log_once()
            except Exception:  # a statistics hiccup must never stop the server
                stats_log.debug("stats logging failed", exc_info=True)

    def log_once(self) -> str | None:
        """Log and return the line, or None when there was nothing to report."""
        if not self._engine.is_ready:
            # The first line's rates are over the time since the engine became ready, not its loading.
            self._last_time = self._clock()
            return None
        stats = self._engine.stats()
        now = self._clock()
        previous = self._last or EngineStats()
        elapsed = max(now - self._last_time, 1e-9)
        self._last, self._last_time = stats, now
        prompt_tokens = stats.prompt_tokens_total - previous.prompt_tokens_total
        generated_tokens = stats.generation_tokens_total - previous.generation_tokens_total
        busy = stats.num_running or stats.num_waiting
        if not (busy or prompt_tokens or generated_tokens):
            return None
        hit_rate = prefix_cache_hit_rate(stats)
        line = (
            f"prompt throughput: {prompt_tokens / elapsed:.1f} tokens/s, "
            f"generation throughput: {generated_tokens / elapsed:.1f} tokens/s, "
            f"running: {stats.num_running} reqs, waiting: {stats.num_waiting} reqs, "
            f"KV cache usage: {stats.kv_cache_usage:.1%}, prefix cache hit rate: {hit_rate:.1%}"
            + _speculation_clause(stats, previous)
        )
        stats_log.info(line)
        return line


def _speculation_clause(stats: EngineStats, previous: EngineStats) -> str:
    """The interval's drafts, where there were any: the share of draft tokens accepted, and the mean
    length of a draft's step (its accepted tokens plus the one it samples itself, as vLLM counts)."""
    drafts = stats.spec_drafts_total - previous.spec_drafts_total
    if drafts <= 0:
        return ""
    proposed = stats.spec_proposed_tokens_total - previous.spec_proposed_tokens_total
    accepted = stats.spec_accepted_tokens_total - previous.spec_accepted_tokens_total
    return (
        f", drafts: {accepted} of {proposed} tokens accepted ({accepted / max(proposed, 1):.1%}), "
        f"mean acceptance length {1 + accepted / drafts:.2f}"
    )
