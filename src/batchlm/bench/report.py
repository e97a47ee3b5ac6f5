"""Turns a run's metrics into the printed table and the vLLM-compatible result JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from batchlm.bench.accounting import account_tokens
from batchlm.bench.loadgen import LoadConfig, LoadOutcome
from batchlm.bench.metrics import BenchMetrics
from batchlm.bench.selfcheck import ClientCheck
from batchlm.bench.spec_counters import SpecActivity
from batchlm.bench.stats import Distribution

_WIDTH = 66
_LABEL = 46
# (JSON name, table heading) of each latency metric, in report order.
LATENCY_METRICS = (
    ("ttft", "Time to First Token"),
    ("tpot", "Time per Output Token (excl. 1st token)"),
    ("token_itl", "Inter-token Latency (per token)"),
    ("itl", "Inter-chunk Latency (vLLM's ITL)"),
    ("e2el", "End-to-end Latency"),
)


@dataclass(frozen=True)
class RunInfo:
    """What was measured, for headers and the JSON."""

    backend: str
    model_id: str
    base_url: str
    stream: bool
    dataset_name: str
    prompt_length_method: str
    num_prompts: int


@dataclass(frozen=True)
class LevelReport:
    """One measured load level."""

    label: str
    load: LoadConfig
    outcome: LoadOutcome
    metrics: BenchMetrics
    check: ClientCheck
    # The server's speculative-decoding counters over the level (None when it exposes none).
    spec: SpecActivity | None = None


def describe_load(load: LoadConfig) -> str:
    duration = f", for {load.duration_s:g} s" if load.duration_s is not None else ""
    if load.concurrency is not None:
        return f"closed loop, {load.concurrency} users{duration}"
    rate = "inf" if load.request_rate is None or math.isinf(load.request_rate) else f"{load.request_rate:g}/s"
    cap = f", max {load.max_concurrency} in flight" if load.max_concurrency else ""
    return f"open loop, rate {rate}, burstiness {load.burstiness:g}{cap}{duration}"


def _row(label: str, value: Any, unit_format: str = "") -> str:
    text = format(value, unit_format) if unit_format else str(value)
    return f"{label:<{_LABEL}} {text}"


def _heading(title: str, fill: str = "-") -> str:
    return f" {title} ".center(_WIDTH, fill)


def format_table(level: LevelReport, info: RunInfo) -> str:
    """The readable per-run report: the seed's summary lines first, then the detail sections."""
    m = level.metrics
    sources = ", ".join(f"{k} x{v}" for k, v in sorted(m.output_token_sources.items())) or "none"
    lines = [
        _heading(f"Benchmark Result: {level.label}", "="),
        _row("Load:", describe_load(level.load)),
        _row("Successful requests:", m.completed),
        _row("Failed requests:", m.failed),
        _row("Total tokens generated:", m.total_output_tokens),
        _row("  output token source (requests):", sources),
        _row("Total input tokens:", m.total_input_tokens),
        _row("  prompt lengths counted by:", info.prompt_length_method),
        _row("Total duration (s):", m.duration_s, ".2f"),
        _row("Throughput (TPS, output tok/s):", m.output_throughput, ".2f"),
        _row("Request throughput (req/s):", m.request_throughput, ".2f"),
        *_goodput_rows(m),
        _row("Total token throughput (tok/s):", m.total_token_throughput, ".2f"),
        _row("Peak output throughput (tok/s, 1 s window):", m.max_output_tokens_per_s, ".0f"),
        _row("Peak concurrent requests:", m.max_concurrent_requests),
        _row("Avg Latency (s):", m.e2el.mean, ".3f") if not m.e2el.empty else _row("Avg Latency (s):", "n/a"),
        _row("Avg TTFT (ms):", _ms_or_na(m.ttft.mean, m.ttft, info.stream)),
        _row("Avg ITL (ms, per token):", _ms_or_na(m.token_itl.mean, m.token_itl, info.stream)),
        _row("Avg TPOT (ms):", _ms_or_na(m.tpot.mean, m.tpot, info.stream)),
    ]
    lines += _spec_rows(level.spec)
    lines += _latency_sections(m, info)
    lines += _failure_section(m)
    lines += _client_section(level.check, m.total_output_tokens)
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def _goodput_rows(m: BenchMetrics) -> list[str]:
    """Request goodput and the objectives it counts against, only when --goodput was given."""
    if m.request_goodput is None:
        return []
    slos = ", ".join(f"{key} <= {value:g} ms" for key, value in m.goodput_slos_ms.items())
    return [_row("Request goodput (req/s):", m.request_goodput, ".2f"), _row("  goodput objectives:", slos)]


def _spec_rows(spec: SpecActivity | None) -> list[str]:
    """The draft acceptance rate, when the server counts speculative tokens and verified some."""
    if spec is None or spec.acceptance_rate is None:
        return []
    accepted = f"{spec.acceptance_rate:.1%} ({spec.accepted:.0f} of {spec.proposed:.0f} draft tokens)"
    return [_row("Speculative decoding acceptance:", accepted)]


def _ms_or_na(value: float, distribution: Distribution, stream: bool) -> str:
    if distribution.empty:
        return "n/a (needs --stream)" if not stream else "n/a (no samples)"
    return f"{value * 1000:.2f}"


def _latency_sections(m: BenchMetrics, info: RunInfo) -> list[str]:
    lines: list[str] = []
    for name, title in LATENCY_METRICS:
        distribution: Distribution = getattr(m, name)
        if distribution.empty:
            continue
        ms = distribution.scaled(1000.0)
        lines.append(_heading(title))
        lines.append(_row(f"Mean {name.upper()} (ms):", ms.mean, ".2f"))
        for q, value in ms.percentiles.items():
            lines.append(_row(f"P{_pct(q)} {name.upper()} (ms):", value, ".2f"))
        lines.append(_row(f"Max {name.upper()} (ms):", ms.maximum, ".2f"))
    if m.chunk_count_methods and info.stream:
        methods = ", ".join(f"{k} x{v}" for k, v in sorted(m.chunk_count_methods.items()))
        lines.append(_row("Tokens per chunk from (requests):", methods))
    return lines


def _failure_section(m: BenchMetrics) -> list[str]:
    if not m.failure_reasons:
        return []
    lines = [_heading("Failures (excluded from latencies)")]
    lines += [f"{count:>6} x {reason}" for reason, count in m.failure_reasons.items()]
    return lines


# Failure reasons a failure alarm quotes (the report lists them all).
ALARM_REASONS = 3


def failure_alarm(level: LevelReport) -> str | None:
    """A loud summary when more than half of a level's requests failed (the run then exits non-zero):
    the count and the first failure reasons; None otherwise."""
    m = level.metrics
    total = m.completed + m.failed
    if total and m.failed * 2 <= total:
        return None
    lines = [_heading(f"FAILED: {m.failed} of {total} requests at {level.label}", "!")]
    lines += [f"{count:>6} x {reason}" for reason, count in list(m.failure_reasons.items())[:ALARM_REASONS]]
    lines.append("Its figures describe only the requests that succeeded; see the failures above.")
    lines.append("!" * _WIDTH)
    return "\n".join(lines)


def _client_section(check: ClientCheck, output_tokens: int) -> list[str]:
    lines = [
        _heading("Client self-check"),
        _row("Client CPU (% of one core):", check.cpu_percent, ".1f"),
        _row("Client CPU per output token (us):", _cpu_per_token_us(check, output_tokens)),
        _row(
            "Event-loop lag p50 / p99 / max (ms):",
            f"{check.loop_lag_p50_s * 1e3:.2f} / {check.loop_lag_p99_s * 1e3:.2f} / {check.loop_lag_max_s * 1e3:.2f}",
        ),
    ]
    if check.max_dispatch_delay_s > 0:
        lines.append(_row("Max late dispatch of an arrival (ms):", check.max_dispatch_delay_s * 1e3, ".2f"))
    lines.append(_row("Verdict:", check.verdict()))
    return lines


def _cpu_per_token_us(check: ClientCheck, output_tokens: int) -> str:
    return f"{check.cpu_s / output_tokens * 1e6:.1f}" if output_tokens else "n/a"


def _pct(q: float) -> str:
    return str(int(q)) if float(q).is_integer() else str(q)


def result_json(
    level: LevelReport, info: RunInfo, detailed: bool, metadata: dict[str, str]
) -> dict[str, Any]:
    """One level's results under vLLM `bench serve` key names, plus batchlm's extra keys."""
    m, load = level.metrics, level.load
    rate = load.request_rate
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": info.backend,
        "model_id": info.model_id,
        "tokenizer_id": None,
        "num_prompts": info.num_prompts,
        **metadata,
        "request_rate": "inf" if rate is None or math.isinf(rate) else rate,
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency if load.concurrency is None else load.concurrency,
        "duration": m.duration_s,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input_tokens,
        "total_output_tokens": m.total_output_tokens,
        "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "max_output_tokens_per_s": m.max_output_tokens_per_s,
        "max_concurrent_requests": m.max_concurrent_requests,
    }
    for name, _ in LATENCY_METRICS:
        result.update(_distribution_keys(name, getattr(m, name)))
    result.update(_batchlm_keys(level, info))
    # The objectives behind request_goodput, {metric: ms} under --goodput's names; null without it.
    result["goodput"] = dict(m.goodput_slos_ms) or None
    if level.spec is not None:
        result["spec_decode_num_draft_tokens"] = level.spec.proposed
        result["spec_decode_num_accepted_tokens"] = level.spec.accepted
        result["spec_decode_acceptance_rate"] = level.spec.acceptance_rate
    if detailed:
        result.update(_detailed_keys(level))
    return result


def _distribution_keys(name: str, distribution: Distribution) -> dict[str, float]:
    ms = distribution.scaled(1000.0)
    keys = {f"mean_{name}_ms": ms.mean, f"median_{name}_ms": ms.median, f"std_{name}_ms": ms.std}
    keys.update({f"p{_pct(q)}_{name}_ms": value for q, value in ms.percentiles.items()})
    return keys


def _batchlm_keys(level: LevelReport, info: RunInfo) -> dict[str, Any]:
    m, check = level.metrics, level.check
    return {
        "label": level.label,
        "load_mode": "closed" if level.load.concurrency is not None else "open",
        "concurrency": level.load.concurrency,
        "stream": info.stream,
        "dataset_name": info.dataset_name,
        "prompt_length_method": info.prompt_length_method,
        "output_token_sources": m.output_token_sources,
        "chunk_count_methods": m.chunk_count_methods,
        "input_token_sources": m.input_token_sources,
        "failure_reasons": m.failure_reasons,
        "tokens_per_second_timeline": m.tokens_per_second,
        "concurrency_timeline": m.concurrency_per_second,
        "client_cpu_percent": check.cpu_percent,
        "client_cpu_us_per_output_token": check.cpu_s / m.total_output_tokens * 1e6
        if m.total_output_tokens
        else None,
        "client_loop_lag_p50_ms": check.loop_lag_p50_s * 1e3,
        "client_loop_lag_p99_ms": check.loop_lag_p99_s * 1e3,
        "client_loop_lag_max_ms": check.loop_lag_max_s * 1e3,
        "client_max_dispatch_delay_ms": check.max_dispatch_delay_s * 1e3,
        "client_bound": check.client_bound,
        "client_warm_connections": level.outcome.warm_connections,
    }


def _detailed_keys(level: LevelReport) -> dict[str, Any]:
    results = sorted(level.outcome.results, key=lambda r: r.index)
    return {
        "input_lens": [
            r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.spec.prompt_len for r in results
        ],
        "output_lens": [account_tokens(r).output_tokens if r.ok else 0 for r in results],
        "ttfts": [r.chunk_times[0] - r.start if r.ok and r.chunk_times else 0.0 for r in results],
        "itls": [
            [b - a for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)] if r.ok else []
            for r in results
        ],
        "e2els": [r.latency if r.ok else 0.0 for r in results],
        "generated_texts": [r.generated_text or "" for r in results],
        "errors": [r.error or "" for r in results],
    }
