"""One request against the stub server: stream parsing, usage, and every failure kind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from batchlm.bench.accounting import account_tokens
from batchlm.bench.records import ChunkCountMethod, TokenSource
from bench_stub import StubOptions, StubServerThread, endpoint_for, send_one


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServerThread]:
    with StubServerThread() as server:
        yield server


@pytest.fixture(scope="module")
def chunky_stub() -> Iterator[StubServerThread]:
    with StubServerThread(StubOptions(tokens_per_chunk=3)) as server:
        yield server


def test_streamed_chat_records_every_chunk_and_the_usage_only_chunk(stub: StubServerThread) -> None:
    result = send_one(endpoint_for(stub.base_url, include_usage=True, keep_text=True), max_tokens=6)
    assert result.ok, result.error
    assert len(result.chunk_times) == 6  # the role chunk and the empty finish chunk are not content
    assert result.chunk_times == sorted(result.chunk_times)
    assert result.start < result.chunk_times[0] <= result.end
    assert result.usage_completion_tokens == 6
    assert result.usage_prompt_tokens == 2 + 5  # two words plus the stub's chat-template overhead
    assert result.generated_text == " tok" * 6
    assert account_tokens(result).source is TokenSource.USAGE


def test_without_include_usage_tokens_are_counted_per_chunk(chunky_stub: StubServerThread) -> None:
    result = send_one(endpoint_for(chunky_stub.base_url, include_usage=False), max_tokens=7)
    assert result.ok, result.error
    assert result.usage_completion_tokens is None
    account = account_tokens(result)
    assert (account.output_tokens, account.source) == (3, TokenSource.CHUNKS)  # chunks of 3, 3, 1 tokens


def test_multi_token_chunks_spread_the_usage_total(chunky_stub: StubServerThread) -> None:
    result = send_one(endpoint_for(chunky_stub.base_url), max_tokens=7)
    account = account_tokens(result)
    assert (account.output_tokens, account.source, account.method) == (
        7,
        TokenSource.USAGE,
        ChunkCountMethod.SPREAD,
    )
    assert account.chunk_tokens == [2, 2, 3]


def test_cumulative_usage_in_every_chunk_gives_exact_chunk_sizes() -> None:
    with StubServerThread(StubOptions(tokens_per_chunk=3, usage_per_chunk=True)) as server:
        result = send_one(endpoint_for(server.base_url), max_tokens=7)
    account = account_tokens(result)
    assert (account.chunk_tokens, account.method) == ([3, 3, 1], ChunkCountMethod.EXACT)


def test_completions_endpoint_reads_text_field(stub: StubServerThread) -> None:
    result = send_one(endpoint_for(stub.base_url, api="completions", keep_text=True), max_tokens=4)
    assert result.ok, result.error
    assert (len(result.chunk_times), result.usage_prompt_tokens, result.generated_text) == (4, 2, " tok" * 4)


def test_non_streamed_response_uses_usage(stub: StubServerThread) -> None:
    result = send_one(endpoint_for(stub.base_url, stream=False), max_tokens=5)
    assert result.ok, result.error
    assert (result.streamed, result.chunk_times, result.usage_completion_tokens) == (False, [], 5)
    assert result.generated_chars == len(" tok" * 5)


def test_keep_alive_comments_are_not_chunks(stub: StubServerThread) -> None:
    result = send_one(endpoint_for(stub.base_url), prompt="FAULT:keepalive", max_tokens=5)
    assert result.ok, result.error
    assert len(result.chunk_times) == 5


@pytest.mark.parametrize(
    ("fault", "reason_start"),
    [
        ("http_500", "HTTP 500: stub fault: internal error"),
        ("inband_error", "in-band error: stub fault: engine died"),
        ("event_error", "in-band error: stub fault: engine died"),
        ("truncate", "truncated stream: ended without data: [DONE] after 5 content chunks"),
        ("disconnect", "transport: ClientPayloadError"),
        ("empty", "empty stream"),
        ("bad_json", "malformed stream: data is not JSON"),
        ("no_stream", "not a stream: the server answered stream=true with one JSON response"),
    ],
)
def test_failures_are_recorded_with_reasons(stub: StubServerThread, fault: str, reason_start: str) -> None:
    result = send_one(endpoint_for(stub.base_url), prompt=f"FAULT:{fault}", max_tokens=10)
    assert not result.ok
    assert result.error is not None and result.error.startswith(reason_start), result.error
    assert result.end >= result.start


def test_unreachable_server_is_a_transport_failure() -> None:
    result = send_one(endpoint_for("http://127.0.0.1:9/v1"))
    assert result.error is not None and result.error.startswith("transport: ClientConnectorError")


def test_error_event_with_plain_text_data_is_an_in_band_error() -> None:
    from batchlm.bench.client import _record_event
    from batchlm.bench.records import RequestResult, RequestSpec

    result = RequestResult(index=0, spec=RequestSpec("p", 1))
    assert not _record_event("error", "engine overloaded", 1.0, True, result, None)
    assert result.error == "in-band error: engine overloaded"
