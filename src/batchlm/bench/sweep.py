"""Sweeps: one label per load level, and one comparison table across the levels."""

from __future__ import annotations

import math

from batchlm.bench.loadgen import LoadConfig
from batchlm.bench.report import LevelReport

# Columns of the sweep table: (heading, width).
_COLUMNS = (
    ("level", 18),
    ("ok", 6),
    ("fail", 5),
    ("req/s", 8),
    ("out tok/s", 10),
    ("peak tok/s", 10),
    ("TTFT p50", 9),
    ("TTFT p99", 9),
    ("TPOT p50", 9),
    ("ITL p50", 8),
    ("E2E p99", 9),
    ("client CPU", 10),
)


def level_label(load: LoadConfig, sweep_name: str | None) -> str:
    """A short name for a level: the swept flag and its value, or the load mode without a sweep."""
    if load.concurrency is not None:
        return f"concurrency={load.concurrency}"
    if sweep_name == "max_concurrency" or (sweep_name is None and load.max_concurrency):
        return f"max_concurrency={load.max_concurrency}"
    rate = load.request_rate
    return "request_rate=inf" if rate is None or math.isinf(rate) else f"request_rate={rate:g}"


def format_sweep_table(levels: list[LevelReport]) -> str:
    """Latencies in ms at the median / 99th percentile; throughput in tokens or requests per second."""
    # Goodput sits beside req/s, only when --goodput was given.
    goodput = any(level.metrics.request_goodput is not None for level in levels)
    columns = [*_COLUMNS[:4], *([("goodput", 8)] if goodput else []), *_COLUMNS[4:]]
    header = " ".join(f"{name:>{width}}" for name, width in columns)
    lines = ["Sweep summary (latencies in ms)", header, "-" * len(header)]
    for level in levels:
        m = level.metrics
        cells = [
            level.label,
            m.completed,
            m.failed,
            f"{m.request_throughput:.2f}",
            *([f"{m.request_goodput or 0.0:.2f}"] if goodput else []),
            f"{m.output_throughput:.1f}",
            f"{m.max_output_tokens_per_s:.0f}",
            _ms(m.ttft.median, m.ttft.count),
            _ms(m.ttft.percentiles.get(99.0), m.ttft.count),
            _ms(m.tpot.median, m.tpot.count),
            _ms(m.token_itl.median, m.token_itl.count),
            _ms(m.e2el.percentiles.get(99.0), m.e2el.count),
            f"{level.check.cpu_percent:.0f}%" + ("!" if level.check.client_bound else ""),
        ]
        lines.append(" ".join(f"{cell!s:>{width}}" for cell, (_, width) in zip(cells, columns, strict=True)))
    if any(level.check.client_bound for level in levels):
        lines.append("! = client-bound at this level: see its self-check")
    return "\n".join(lines)


def _ms(seconds: float | None, count: int) -> str:
    if seconds is None or count == 0:
        return "n/a"
    return f"{seconds * 1000:.1f}"
