"""Metric math on hand-built request timelines, checked against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchlm.bench.accounting import account_tokens, spread_evenly
from batchlm.bench.metrics import compute_metrics
from batchlm.bench.records import ChunkCountMethod, RequestResult, RequestSpec, TokenSource
from batchlm.bench.stats import percentile, summarize

EXACT = {"rel": 1e-9, "abs": 1e-12}


def result(
    start: float,
    end: float,
    chunks: list[float],
    usage: int | None = None,
    cumulative: list[int | None] | None = None,
    prompt_usage: int | None = None,
    prompt_len: int | None = None,
    error: str | None = None,
    streamed: bool = True,
) -> RequestResult:
    return RequestResult(
        index=0,
        spec=RequestSpec(prompt="p", max_tokens=16, prompt_len=prompt_len),
        start=start,
        end=end,
        chunk_times=chunks,
        chunk_cumulative_tokens=cumulative if cumulative is not None else [None] * len(chunks),
        usage_completion_tokens=usage,
        usage_prompt_tokens=prompt_usage,
        generated_chars=len(chunks),
        error=error,
        streamed=streamed,
    )


# A: usage says 5 tokens over 3 chunks (spread 1, 2, 2); B: cumulative usage in every chunk (1, 2);
# C: failed; D: no usage at all (one token per chunk).
A = result(10.0, 11.2, [10.5, 10.7, 11.0], usage=5)
B = result(10.2, 10.8, [10.4, 10.6], usage=3, cumulative=[1, 3], prompt_usage=7)
C = result(10.1, 10.3, [], error="HTTP 500: boom")
D = result(11.5, 12.0, [11.6, 11.9], prompt_len=4)


def test_totals_and_throughputs() -> None:
    m = compute_metrics([A, B, C, D], run_start=10.0, duration_s=2.0, percentiles=[50, 90, 99])
    assert (m.completed, m.failed) == (3, 1)
    assert m.total_output_tokens == 5 + 3 + 2
    assert m.total_input_tokens == 7 + 4
    assert m.input_token_sources == {"usage": 1, "dataset": 1, "unknown": 1}
    assert m.output_token_sources == {"usage": 2, "chunks": 1}
    assert m.chunk_count_methods == {"spread": 1, "exact": 1, "one_per_chunk": 1}
    assert m.request_throughput == pytest.approx(1.5, **EXACT)
    assert m.output_throughput == pytest.approx(5.0, **EXACT)
    assert m.total_token_throughput == pytest.approx(10.5, **EXACT)
    assert m.failure_reasons == {"HTTP 500: boom": 1}


def test_latency_distributions() -> None:
    m = compute_metrics([A, B, C, D], run_start=10.0, duration_s=2.0, percentiles=[50, 90, 99])
    # TTFT: A 0.5, B 0.2, D 0.1 (C failed: excluded).
    assert m.ttft.count == 3
    assert m.ttft.mean == pytest.approx(0.8 / 3, **EXACT)
    assert m.ttft.median == pytest.approx(0.2, **EXACT)
    assert m.ttft.percentiles[90] == pytest.approx(0.2 + 0.8 * 0.3, **EXACT)
    # TPOT = (E2EL - TTFT) / (N - 1): A (1.2-0.5)/4, B (0.6-0.2)/2, D (0.5-0.1)/1.
    assert sorted(m.tpot.percentiles) == [50, 90, 99]
    assert m.tpot.mean == pytest.approx((0.175 + 0.2 + 0.4) / 3, **EXACT)
    # Chunk gaps: A 0.2, 0.3; B 0.2; D 0.3.
    assert m.itl.count == 4
    assert m.itl.mean == pytest.approx(0.25, **EXACT)
    # Per token: A 0.2/2 x2, 0.3/2 x2; B 0.2/2 x2; D 0.3/1.
    assert m.token_itl.count == 7
    assert m.token_itl.mean == pytest.approx(1.0 / 7, **EXACT)
    assert m.token_itl.maximum == pytest.approx(0.3, **EXACT)
    assert m.e2el.mean == pytest.approx((1.2 + 0.6 + 0.5) / 3, **EXACT)


def test_throughput_timeline_peak_and_concurrency() -> None:
    m = compute_metrics([A, B, C, D], run_start=10.0, duration_s=2.0, percentiles=[99])
    # Window 0: A 1+2, B 1+2; window 1: A 2, D 1+1; window 2: nothing.
    assert m.tokens_per_second == [6.0, 4.0, 0.0]
    assert m.max_output_tokens_per_s == 6.0
    # A, C and B overlap during [10.2, 10.3].
    assert m.max_concurrent_requests == 3
    assert m.concurrency_per_second == pytest.approx([1.8, 0.7, 0.0], **EXACT)


def test_non_streamed_requests_have_no_ttft_and_count_tokens_at_the_end() -> None:
    whole = result(0.0, 1.5, [], usage=4, streamed=False)
    unknown = result(0.0, 0.5, [], streamed=False)
    m = compute_metrics([whole, unknown], run_start=0.0, duration_s=1.5, percentiles=[50])
    assert m.ttft.empty and m.tpot.empty and m.itl.empty
    assert m.total_output_tokens == 4
    assert m.output_token_sources == {"usage": 1, "none": 1}
    assert m.tokens_per_second == [0.0, 4.0]
    assert m.e2el.mean == pytest.approx(1.0, **EXACT)


def test_no_successes_gives_zeros_not_errors() -> None:
    m = compute_metrics([C], run_start=10.0, duration_s=0.3, percentiles=[99])
    assert (m.completed, m.failed, m.total_output_tokens, m.output_throughput) == (0, 1, 0, 0.0)
    assert m.ttft.empty and m.ttft.percentiles == {99: 0.0}
    assert m.max_output_tokens_per_s == 0.0


def test_token_accounting_methods() -> None:
    assert account_tokens(A).chunk_tokens == [1, 2, 2]
    assert account_tokens(A).method is ChunkCountMethod.SPREAD
    assert account_tokens(B).chunk_tokens == [1, 2]
    assert account_tokens(B).method is ChunkCountMethod.EXACT
    no_usage = account_tokens(D)
    assert (no_usage.output_tokens, no_usage.source, no_usage.method) == (
        2,
        TokenSource.CHUNKS,
        ChunkCountMethod.ONE_PER_CHUNK,
    )
    matching = account_tokens(result(0, 1, [0.1, 0.2, 0.3], usage=3))
    assert (matching.chunk_tokens, matching.method) == ([1, 1, 1], ChunkCountMethod.ONE_PER_CHUNK)
    # A counter that goes backwards is ignored in favour of spreading the final usage.
    backwards = account_tokens(result(0, 1, [0.1, 0.2], usage=4, cumulative=[3, 2]))
    assert (backwards.chunk_tokens, backwards.method) == ([2, 2], ChunkCountMethod.SPREAD)
    # Cumulative counts without a final usage chunk: the last cumulative value is the total.
    no_final = account_tokens(result(0, 1, [0.1, 0.2], cumulative=[2, 5]))
    assert (no_final.output_tokens, no_final.chunk_tokens) == (5, [2, 3])


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=500))
def test_spread_evenly_sums_and_differs_by_at_most_one(total: int, parts: int) -> None:
    counts = spread_evenly(total, parts)
    assert len(counts) == parts and sum(counts) == total
    assert max(counts) - min(counts) <= 1


@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=50),
    st.floats(min_value=0, max_value=100),
)
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(sorted(values), q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_summary_std_is_population_std_and_percentile_bounds_checked() -> None:
    summary = summarize([1.0, 2.0, 3.0, 4.0], [99])
    assert summary.std == pytest.approx(float(np.std([1, 2, 3, 4])), **EXACT)
    assert summary.percentiles[99] == pytest.approx(3.97, **EXACT)
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_without_usage_the_tokenize_count_of_the_text_is_the_output() -> None:
    """A server reporting no usage had one token counted per chunk, whatever each chunk carried."""
    counted = result(0, 1, [0.1, 0.2, 0.3])
    counted.counted_completion_tokens = 7
    account = account_tokens(counted)
    assert (account.output_tokens, account.source, account.chunk_tokens) == (
        7,
        TokenSource.TOKENIZED,
        [2, 2, 3],
    )
    whole = result(0, 1, [], streamed=False)
    whole.counted_completion_tokens = 4
    assert (account_tokens(whole).output_tokens, account_tokens(whole).source) == (4, TokenSource.TOKENIZED)
    reported = result(0, 1, [0.1], usage=2)
    reported.counted_completion_tokens = 9  # usage, when there is one, wins
    assert (account_tokens(reported).output_tokens, account_tokens(reported).source) == (2, TokenSource.USAGE)
