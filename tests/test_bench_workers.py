"""Splitting one load level over several client processes, and merging what they measured."""

from __future__ import annotations

import math

import pytest

from batchlm.bench.loadgen import LoadConfig, LoadOutcome
from batchlm.bench.records import RequestResult, RequestSpec
from batchlm.bench.selfcheck import ClientCheck
from batchlm.bench.workers import merge, processes_for, share_of


def test_users_are_dealt_out_and_a_process_without_users_gets_nothing() -> None:
    shares = [share_of(LoadConfig(concurrency=5, seed=3), i, 3) for i in range(3)]
    assert [s.concurrency for s in shares if s is not None] == [2, 2, 1]
    assert len({s.seed for s in shares if s is not None}) == 3  # independent arrival streams
    assert share_of(LoadConfig(concurrency=1), 1, 2) is None


def test_a_level_uses_no_more_processes_than_it_has_requests_in_flight() -> None:
    assert processes_for(LoadConfig(concurrency=1), 4) == 1
    assert processes_for(LoadConfig(concurrency=16), 4) == 4
    assert processes_for(LoadConfig(request_rate=5.0, max_concurrency=2), 4) == 2
    assert processes_for(LoadConfig(request_rate=math.inf), 4) == 4  # no cap: every process


def test_open_loop_rate_and_cap_are_split() -> None:
    load = LoadConfig(request_rate=30.0, max_concurrency=7)
    shares = [share_of(load, i, 3) for i in range(3)]
    assert [s.request_rate for s in shares if s is not None] == [10.0, 10.0, 10.0]
    assert [s.max_concurrency for s in shares if s is not None] == [3, 2, 2]
    burst = share_of(LoadConfig(request_rate=math.inf), 0, 4)
    assert burst is not None and burst.request_rate == math.inf and burst.max_concurrency is None


def _result(index: int, start: float, end: float) -> RequestResult:
    result = RequestResult(index=index, spec=RequestSpec("p", 4), scheduled=start)
    result.start, result.end = start, end
    return result


def _check(cpu_percent: float, cpu_s: float, lag_p99: float) -> ClientCheck:
    return ClientCheck(cpu_percent, cpu_s, 0.001, lag_p99, lag_p99, 10)


def test_merge_renumbers_spans_the_whole_run_and_keeps_the_busiest_client() -> None:
    first = LoadOutcome([_result(0, 10.0, 11.0), _result(1, 10.1, 12.5)], 10.0, 2.5, 0.0)
    second = LoadOutcome([_result(0, 10.05, 11.2)], 10.05, 3.0, 0.2)
    outcome, check = merge([(0, 2, first, _check(40.0, 1.0, 0.002)), (1, 2, second, _check(90.0, 2.0, 0.03))])
    # Process i's j-th request was the workload's i + 2j; results stay in completion order.
    assert [r.index for r in outcome.results] == [0, 1, 2]
    assert outcome.run_start == 10.0 and outcome.duration_s == pytest.approx(3.05)
    assert outcome.max_dispatch_delay_s == 0.2
    assert (check.cpu_percent, check.cpu_s, check.loop_lag_p99_s, check.lag_samples) == (90.0, 3.0, 0.03, 20)
    assert check.client_bound
