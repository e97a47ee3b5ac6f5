"""Benchmark metrics computed from request timelines; every definition is stated where it is computed.

Notation for one successful request: s = send time, t_1..t_K = arrival times of its K content-bearing
chunks, k_1..k_K = tokens in each chunk (see accounting.py), e = time the response was complete,
N = output tokens. Failed requests count only in `failed` and `failure_reasons`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from batchlm.bench.accounting import TokenAccount, account_tokens
from batchlm.bench.goodput import count_good, request_latencies
from batchlm.bench.records import RequestResult
from batchlm.bench.stats import Distribution, summarize


@dataclass(frozen=True)
class BenchMetrics:
    """Aggregate results of one run. Latency distributions are in seconds."""

    completed: int
    failed: int
    # Wall time from the first request sent to the last response finished (the seed's "Total duration").
    duration_s: float
    total_input_tokens: int
    # Sum of N over successful requests (the seed's "Total tokens generated").
    total_output_tokens: int
    # completed / duration.
    request_throughput: float
    # total_output_tokens / duration (the seed's "Throughput (TPS)").
    output_throughput: float
    # (total_input_tokens + total_output_tokens) / duration.
    total_token_throughput: float
    # Most output tokens whose chunks arrived within one 1-second window of the run (vLLM's peak).
    max_output_tokens_per_s: float
    # Most requests in flight at one instant (failed ones too: the server held them).
    max_concurrent_requests: int
    # TTFT = t_1 - s (streaming only).
    ttft: Distribution
    # TPOT = (e - s - TTFT) / (N - 1), requests with N > 1 (streaming only).
    tpot: Distribution
    # Chunk ITL = t_i - t_{i-1}: gaps between chunks, vLLM's "ITL".
    itl: Distribution
    # Per-token ITL: each chunk gap divided by the chunk's tokens, counted once per token.
    token_itl: Distribution
    # End-to-end latency E2EL = e - s.
    e2el: Distribution
    # Failure reason -> count.
    failure_reasons: dict[str, int] = field(default_factory=dict)
    # Requests per output-token source ("usage", "tokenized", "chunks", "none").
    output_token_sources: dict[str, int] = field(default_factory=dict)
    # Requests per chunk token-count method (see records.ChunkCountMethod).
    chunk_count_methods: dict[str, int] = field(default_factory=dict)
    # Requests whose input tokens came from usage / the dataset / were unknown.
    input_token_sources: dict[str, int] = field(default_factory=dict)
    # Output tokens per 1-second window since the run start.
    tokens_per_second: list[float] = field(default_factory=list)
    # Mean requests in flight during each 1-second window (time-weighted, failed ones too).
    concurrency_per_second: list[float] = field(default_factory=list)
    # --goodput's objectives, {metric: ms}; empty without it.
    goodput_slos_ms: dict[str, float] = field(default_factory=dict)
    # Successful requests meeting every objective / duration; None without --goodput.
    request_goodput: float | None = None


@dataclass
class LatencySamples:
    """Per-metric samples (seconds) gathered over the successful requests."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    token_itl: list[float] = field(default_factory=list)
    e2el: list[float] = field(default_factory=list)


def compute_metrics(
    results: Sequence[RequestResult],
    run_start: float,
    duration_s: float,
    percentiles: Sequence[float],
    goodput_slos_ms: Mapping[str, float] | None = None,
) -> BenchMetrics:
    """Aggregates request timelines into BenchMetrics; `run_start` anchors the 1-second windows;
    `goodput_slos_ms` ({metric: ms}, see goodput.py) adds the request goodput."""
    successes = [r for r in results if r.ok]
    accounts = [account_tokens(r) for r in successes]
    samples = collect_samples(successes, accounts)
    input_tokens, input_sources = _input_tokens(successes)
    output_tokens = sum(a.output_tokens for a in accounts)
    windows = math.floor(max(r.end for r in results) - run_start) + 1 if results else 0
    tokens_per_second = _tokens_per_second(successes, accounts, run_start, windows)

    def rate(amount: float) -> float:
        return amount / duration_s if duration_s > 0 else 0.0

    return BenchMetrics(
        completed=len(successes),
        failed=len(results) - len(successes),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=rate(len(successes)),
        output_throughput=rate(output_tokens),
        total_token_throughput=rate(input_tokens + output_tokens),
        max_output_tokens_per_s=max(tokens_per_second, default=0.0),
        max_concurrent_requests=_peak_in_flight(results),
        **{
            name: summarize(getattr(samples, name), percentiles)
            for name in ("ttft", "tpot", "itl", "token_itl", "e2el")
        },
        failure_reasons=dict(Counter(r.error for r in results if r.error is not None).most_common()),
        output_token_sources=dict(Counter(a.source.value for a in accounts)),
        chunk_count_methods=dict(Counter(a.method.value for a in accounts)),
        input_token_sources=input_sources,
        tokens_per_second=tokens_per_second,
        concurrency_per_second=_mean_in_flight(results, run_start, windows),
        goodput_slos_ms=dict(goodput_slos_ms or {}),
        request_goodput=rate(count_good(successes, accounts, goodput_slos_ms)) if goodput_slos_ms else None,
    )


def collect_samples(
    successes: Sequence[RequestResult], accounts: Sequence[TokenAccount] | None = None
) -> LatencySamples:
    """Latency samples of successful requests (accounts are computed when not given)."""
    samples = LatencySamples()
    for i, result in enumerate(successes):
        _add_request_samples(samples, result, accounts[i] if accounts is not None else account_tokens(result))
    return samples


def _add_request_samples(samples: LatencySamples, result: RequestResult, account: TokenAccount) -> None:
    latencies = request_latencies(result, account)
    samples.e2el.append(result.latency)
    ttft, tpot = latencies["ttft"], latencies["tpot"]
    if ttft is None:
        return
    samples.ttft.append(ttft)
    if tpot is not None:
        samples.tpot.append(tpot)
    times = result.chunk_times
    for i in range(1, len(times)):
        gap = times[i] - times[i - 1]
        samples.itl.append(gap)
        tokens = account.chunk_tokens[i]
        if tokens > 0:
            samples.token_itl.extend([gap / tokens] * tokens)


def _input_tokens(successes: Sequence[RequestResult]) -> tuple[int, dict[str, int]]:
    """Prompt tokens from the server's usage, else the dataset's known length, else unknown (0)."""
    total = 0
    sources: Counter[str] = Counter()
    for result in successes:
        if result.usage_prompt_tokens is not None:
            total += result.usage_prompt_tokens
            sources["usage"] += 1
        elif result.spec.prompt_len is not None:
            total += result.spec.prompt_len
            sources["dataset"] += 1
        else:
            sources["unknown"] += 1
    return total, dict(sources)


def _tokens_per_second(
    successes: Sequence[RequestResult], accounts: Sequence[TokenAccount], run_start: float, windows: int
) -> list[float]:
    """Output tokens arriving in each 1-second window [run_start + j, run_start + j + 1); a chunk's
    tokens count at its arrival, a non-streamed response's at its end."""
    tokens = [0.0] * windows
    for result, account in zip(successes, accounts, strict=True):
        if account.chunk_tokens:
            for arrival, count in zip(result.chunk_times, account.chunk_tokens, strict=True):
                tokens[_window(arrival, run_start, windows)] += count
        else:
            tokens[_window(result.end, run_start, windows)] += account.output_tokens
    return tokens


def _mean_in_flight(results: Sequence[RequestResult], run_start: float, windows: int) -> list[float]:
    """Time-weighted mean of requests in flight during each 1-second window."""
    busy = [0.0] * windows
    for result in results:
        for j in range(
            _window(result.start, run_start, windows), _window(result.end, run_start, windows) + 1
        ):
            window_start = run_start + j
            overlap = min(result.end, window_start + 1.0) - max(result.start, window_start)
            busy[j] += max(0.0, overlap)
    return busy


def _peak_in_flight(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at one instant; a request ending exactly when another starts does not overlap."""
    events = sorted(
        [(r.start, 1) for r in results] + [(r.end, -1) for r in results], key=lambda e: (e[0], e[1])
    )
    peak = current = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def _window(timestamp: float, run_start: float, windows: int) -> int:
    return min(windows - 1, max(0, math.floor(timestamp - run_start)))
