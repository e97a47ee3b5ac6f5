"""Charts of a run (latency distributions, throughput over time) and of a sweep; matplotlib loads lazily."""

from __future__ import annotations

from typing import Any

from batchlm.bench.metrics import collect_samples
from batchlm.bench.report import LevelReport


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'batchlm[bench]'") from None
    return plt


# Panel title -> the BenchMetrics / LatencySamples attribute it shows.
LATENCY_PANELS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL per token", "token_itl"), ("E2E latency", "e2el"))


def latency_panels_ms(level: LevelReport) -> list[tuple[str, list[float], float]]:
    """(title, per-sample latencies of the successful requests, the report's median), in milliseconds;
    the median line is the report's own, so chart and table never disagree."""
    samples = collect_samples([r for r in level.outcome.results if r.ok])
    return [
        (title, [v * 1e3 for v in getattr(samples, name)], getattr(level.metrics, name).median * 1e3)
        for title, name in LATENCY_PANELS
    ]


def plot_run(level: LevelReport, path: str) -> None:
    """Histograms of TTFT, TPOT, per-token ITL and E2E latency, plus tokens/s and concurrency over time."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for axis, (name, values, median) in zip(axes.flat[:4], latency_panels_ms(level), strict=True):
        axis.set_title(f"{name} (ms)")
        if values:
            axis.hist(values, bins=40, color="tab:blue")
            axis.axvline(median, color="tab:orange", label="median")
            axis.legend()
        else:
            axis.text(0.5, 0.5, "no samples", ha="center", va="center", transform=axis.transAxes)
        axis.set_ylabel("count")
    seconds = list(range(len(level.metrics.tokens_per_second)))
    axes[1][1].plot(seconds, level.metrics.tokens_per_second, drawstyle="steps-post")
    axes[1][1].set_title("Output tokens per second")
    axes[1][1].set_xlabel("time since start (s)")
    axes[1][2].plot(seconds, level.metrics.concurrency_per_second, drawstyle="steps-post", color="tab:green")
    axes[1][2].set_title("Requests in flight (per 1 s window)")
    axes[1][2].set_xlabel("time since start (s)")
    figure.suptitle(f"batchlm bench: {level.label}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_sweep(levels: list[LevelReport], sweep_name: str, path: str) -> None:
    """Throughput and latency percentiles against the swept level."""
    plt = _pyplot()
    labels = [level.label.split("=", 1)[-1] for level in levels]
    x = list(range(len(levels)))
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    left.plot(x, [lv.metrics.output_throughput for lv in levels], marker="o", label="output tok/s")
    left.plot(x, [lv.metrics.max_output_tokens_per_s for lv in levels], marker="^", label="peak tok/s")
    left.set_ylabel("tokens / s")
    left.set_title("Throughput")
    left.legend()
    for name, attribute in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL/token", "token_itl"), ("E2E", "e2el")):
        for q, style in ((50.0, "-"), (99.0, "--")):
            values = [getattr(lv.metrics, attribute).percentiles.get(q, float("nan")) * 1e3 for lv in levels]
            right.plot(x, values, style, marker="o", label=f"{name} p{q:g}")
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.set_title("Latency")
    right.legend(fontsize="small")
    for axis in (left, right):
        axis.set_xticks(x, labels)
        axis.set_xlabel(sweep_name)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
