"""Goodput: successful requests per second that met every latency objective (vLLM's `--goodput`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from batchlm.bench.accounting import TokenAccount
from batchlm.bench.records import RequestResult

# The objectives `--goodput` takes, under vLLM's names; values are milliseconds.
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: Sequence[str], stream: bool) -> dict[str, float]:
    """`--goodput KEY:VALUE ...` as {metric: milliseconds}; raises ValueError naming the flag."""
    slos: dict[str, float] = {}
    for item in items:
        key, sep, text = item.partition(":")
        key = key.strip().lower()
        if not sep or not text.strip():
            raise ValueError(f"--goodput expects KEY:VALUE (milliseconds), got {item!r}")
        if key not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput: unknown metric {key!r} in {item!r}; use {', '.join(GOODPUT_METRICS)}"
            )
        if key in slos:
            raise ValueError(f"--goodput: {key} given more than once")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"--goodput: {key} needs a number of milliseconds, got {text.strip()!r}"
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"--goodput: {key} must be a finite number of milliseconds > 0, got {text.strip()}"
            )
        slos[key] = value
    # A non-streamed response has no first-token time, so no TTFT or TPOT to hold to an objective.
    timed = [key for key in ("ttft", "tpot") if key in slos]
    if timed and not stream:
        raise ValueError(f"--goodput {'/'.join(timed)} is measured on streamed responses: add --stream")
    return slos


def request_latencies(result: RequestResult, account: TokenAccount) -> dict[str, float | None]:
    """One successful request's TTFT, TPOT and E2EL in seconds, as the metrics define them: TTFT is
    None without a streamed chunk, TPOT None with fewer than 2 output tokens."""
    ttft = tpot = None
    if result.streamed and result.chunk_times:
        ttft = result.chunk_times[0] - result.start
        if account.output_tokens > 1:
            tpot = (result.latency - ttft) / (account.output_tokens - 1)
    return {"ttft": ttft, "tpot": tpot, "e2el": result.latency}


def meets_slos(latencies: Mapping[str, float | None], slos_ms: Mapping[str, float]) -> bool:
    """Whether a request met every objective. One output token has no TPOT and meets a TPOT
    objective (vLLM counts its TPOT as 0); a missing TTFT cannot be shown to meet one."""
    for key, limit_ms in slos_ms.items():
        value = latencies[key]
        if value is None:
            if key == "tpot":
                continue
            return False
        if value * 1000.0 > limit_ms:
            return False
    return True


def count_good(
    successes: Sequence[RequestResult], accounts: Sequence[TokenAccount], slos_ms: Mapping[str, float]
) -> int:
    """Successful requests that met every objective (failed ones are never good: pass only successes)."""
    return sum(
        meets_slos(request_latencies(result, account), slos_ms)
        for result, account in zip(successes, accounts, strict=True)
    )
