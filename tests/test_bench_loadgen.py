"""Arrival schedules and load configuration of the load generator."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics

import aiohttp
import pytest

from batchlm.bench.loadgen import LoadConfig, LoadGenerator, arrival_gaps
from batchlm.bench.records import RequestSpec
from bench_stub import StubServerThread, endpoint_for


def gaps(rate: float, burstiness: float, n: int, seed: str = "0") -> list[float]:
    return list(itertools.islice(arrival_gaps(rate, burstiness, random.Random(seed)), n))


def test_infinite_rate_sends_everything_at_once() -> None:
    assert gaps(math.inf, 1.0, 5) == [0.0] * 5


def test_infinite_burstiness_gives_a_constant_interval() -> None:
    assert gaps(4.0, math.inf, 3) == [0.25, 0.25, 0.25]


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    assert gaps(10.0, 1.0, 50, "a") == gaps(10.0, 1.0, 50, "a")
    assert gaps(10.0, 1.0, 50, "a") != gaps(10.0, 1.0, 50, "b")


def test_gamma_gaps_have_mean_one_over_rate_and_burstiness_sets_spread() -> None:
    # Seeded, so these sample statistics are fixed numbers; the bounds only document what they mean.
    poisson, bursty, regular = gaps(5.0, 1.0, 20_000), gaps(5.0, 0.25, 20_000), gaps(5.0, 16.0, 20_000)
    for sample in (poisson, bursty, regular):
        assert statistics.fmean(sample) == pytest.approx(0.2, rel=0.05)
    # Coefficient of variation of a gamma(k) interval is 1/sqrt(k).
    assert statistics.pstdev(poisson) / statistics.fmean(poisson) == pytest.approx(1.0, rel=0.05)
    assert statistics.pstdev(bursty) / statistics.fmean(bursty) == pytest.approx(2.0, rel=0.05)
    assert statistics.pstdev(regular) / statistics.fmean(regular) == pytest.approx(0.25, rel=0.05)


def test_non_positive_rates_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        next(arrival_gaps(0.0, 1.0, random.Random(0)))
    with pytest.raises(ValueError, match="positive"):
        next(arrival_gaps(1.0, -1.0, random.Random(0)))


def test_load_config_needs_exactly_one_mode() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        LoadConfig()
    with pytest.raises(ValueError, match="exactly one"):
        LoadConfig(concurrency=2, request_rate=1.0)
    assert LoadConfig(concurrency=3).in_flight_limit == 3
    assert LoadConfig(request_rate=1.0, max_concurrency=5).in_flight_limit == 5
    assert LoadConfig(request_rate=1.0).in_flight_limit is None


def test_open_loop_sends_the_first_request_at_the_start_not_one_gap_later() -> None:
    """The duration runs from the first request sent; an arrival gap before it would be idle time
    counted in it (at 0.5 req/s, 3 requests took 6.4 s instead of 4.2 s). Timing-free: `scheduled`
    is computed from `run_start`, not measured."""

    async def go(base_url: str) -> tuple[float, list[float]]:
        async with aiohttp.ClientSession() as session:
            specs = [RequestSpec(prompt="hello", max_tokens=2)] * 3
            generator = LoadGenerator(session, endpoint_for(base_url), specs)
            outcome = await generator.run(LoadConfig(request_rate=1000.0, burstiness=math.inf))
        return outcome.run_start, sorted(r.scheduled for r in outcome.results)

    with StubServerThread() as server:
        run_start, scheduled = asyncio.run(go(server.base_url))
    assert scheduled[0] == run_start
    assert scheduled[1] == pytest.approx(run_start + 0.001)
    assert scheduled[2] == pytest.approx(run_start + 0.002)
