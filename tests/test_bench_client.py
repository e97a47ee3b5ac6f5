"""One request against the stub server: stream parsing, usage, and every failure kind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batchlm.bench import client
from batchlm.bench.accounting import account_tokens
from batchlm.bench.client import send_request
from batchlm.bench.records import ChunkCountMethod, RequestResult, RequestSpec, TokenSource
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


def test_an_unknown_stub_fault_is_answered_with_a_400(stub: StubServerThread) -> None:
    """The stub raised inside its handler and never answered: the client waited out its timeout."""
    result = send_one(endpoint_for(stub.base_url), prompt="FAULT:no_such_fault")
    assert result.error is not None and result.error.startswith(
        "HTTP 400: unknown stub fault 'no_such_fault'"
    )


def test_unreachable_server_is_a_transport_failure() -> None:
    result = send_one(endpoint_for("http://127.0.0.1:9/v1"))
    assert result.error is not None and result.error.startswith("transport: ClientConnectorError")


def test_error_event_with_plain_text_data_is_an_in_band_error() -> None:
    from batchlm.bench.client import _record_event
    from batchlm.bench.records import RequestResult, RequestSpec

    result = RequestResult(index=0, spec=RequestSpec("p", 1))
    assert not _record_event("error", "engine overloaded", 1.0, True, result, None)
    assert result.error == "in-band error: engine overloaded"


class _FirstPostDisconnects:
    """A session whose first POST dies unanswered, as on a kept-alive connection the server already
    closed (llama-server closes one after every stream while announcing Keep-Alive)."""

    def __init__(self, session: object, error: Exception | None) -> None:
        self._session = session
        self._error = error
        self.posts = 0

    def post(self, *args: object, **kwargs: object) -> object:
        self.posts += 1
        if self.posts == 1 and self._error is not None:
            error = self._error

            class _Dead:
                async def __aenter__(self) -> None:
                    raise error

                async def __aexit__(self, *exc: object) -> None:
                    return None

            return _Dead()
        return self._session.post(*args, **kwargs)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "error",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(None, "Can not write request body for http://x/v1/chat/completions"),
    ],
)
def test_an_unanswered_request_on_a_stale_connection_is_sent_again(
    stub: StubServerThread, error: Exception
) -> None:
    async def go() -> tuple[RequestResult, int]:
        async with aiohttp.ClientSession() as session:
            flaky = _FirstPostDisconnects(session, error)
            result = RequestResult(index=0, spec=RequestSpec(prompt="hello", max_tokens=3))
            await send_request(flaky, endpoint_for(stub.base_url), result)  # type: ignore[arg-type]
            return result, flaky.posts

    result, posts = asyncio.run(go())
    assert result.ok, result.error
    assert posts == 2
    assert account_tokens(result).output_tokens == 3


def test_a_refused_connection_is_not_sent_again() -> None:
    async def go() -> int:
        async with aiohttp.ClientSession() as session:
            flaky = _FirstPostDisconnects(session, None)  # only counts the POSTs
            result = RequestResult(index=0, spec=RequestSpec(prompt="hello", max_tokens=3))
            await send_request(flaky, endpoint_for("http://127.0.0.1:9/v1"), result)  # type: ignore[arg-type]
            assert result.error is not None and result.error.startswith("transport: ClientConnectorError")
            return flaky.posts

    assert asyncio.run(go()) == 1


def raw_answer(
    writes: list[bytes], content_type: str = "text/event-stream", then: str = "end"
) -> RequestResult:
    """One streamed chat request to a server that answers 200 with exactly `writes`, then ends the body
    (`then="end"`), resets the connection ("reset") or holds the body open until the request is over
    ("hold")."""

    async def go() -> RequestResult:
        over = asyncio.Event()

        async def chat(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": content_type})
            await response.prepare(request)
            for data in writes:
                await response.write(data)
            if then == "reset":
                assert request.transport is not None
                request.transport.abort()
                return response
            if then == "hold":
                await over.wait()
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            result = RequestResult(index=0, spec=RequestSpec(prompt="hello", max_tokens=1))
            await send_request(session, endpoint_for(str(server.make_url("/v1"))), result)
            over.set()
            return result

    return asyncio.run(go())


CONTENT = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'


def test_a_stream_ending_with_done_but_no_blank_line_is_complete() -> None:
    """`data: [DONE]\\n` then the end of the body: the server did send [DONE] (the OpenAI SDK takes it);
    it was reported as "truncated stream: ended without data: [DONE]"."""
    result = raw_answer([CONTENT, b"data: [DONE]\n"])
    assert result.ok, result.error
    assert len(result.chunk_times) == 1 and result.end >= result.chunk_times[0]


def test_a_llama_cpp_error_line_fails_the_request_with_its_message() -> None:
    """llama-server reports a failure mid-stream as `error: {...}`, then sends data: [DONE]; the line
    was ignored and the cut-short request counted as a success."""
    error = b'error: {"code": 500, "message": "slot died", "type": "server_error"}\n\n'
    result = raw_answer([CONTENT, error, b"data: [DONE]\n\n"])
    assert result.error == "in-band error: slot died"
    assert raw_answer([error, b"data: [DONE]\n\n"]).error == "in-band error: slot died"


@pytest.mark.parametrize(
    "chunk",
    [
        b"data: null\n\n",
        b'data: {"choices": [null]}\n\n',
        b'data: {"choices": [{"delta": {"content": ["a"]}}]}\n\n',
        b'data: {"choices": [{"delta": "a"}]}\n\n',
    ],
)
def test_a_chunk_of_the_wrong_shape_is_a_failure_not_a_crash(chunk: bytes) -> None:
    """Such chunks raised AssertionError, AttributeError or TypeError out of send_request, which ended
    the whole run with a traceback."""
    result = raw_answer([CONTENT, chunk, b"data: [DONE]\n\n"])
    assert result.error is not None and result.error.startswith("malformed response: "), result.error
    assert result.end >= result.start


def test_a_body_without_events_says_what_came_instead() -> None:
    """A 200 to stream=true whose body holds no event (a web page; a JSON error sent as an event
    stream) was reported as "truncated stream ... after 0 content chunks"."""
    page = raw_answer([b"<html><body>Log in</body></html>"], content_type="text/html")
    assert (
        page.error
        == "not a stream: the server answered stream=true with text/html: b'<html><body>Log in</body></html>'"
    )
    error = raw_answer([b'{"error": {"message": "no such model"}}'])
    assert error.error == "in-band error: no such model"
    cut = raw_answer([b": keep-alive\n\n"])
    assert cut.error is not None and cut.error.startswith("truncated stream: ended without data: [DONE]")


@pytest.mark.parametrize("then", ["reset", "hold"])
def test_what_follows_the_last_event_does_not_fail_a_complete_request(
    then: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After data: [DONE] the client read on to the end of the body: a connection reset there made the
    complete request a transport failure, and a body held open made it a timeout once
    --request-timeout had passed."""
    monkeypatch.setattr(client, "DRAIN_GRACE_S", 0.05)
    result = raw_answer([CONTENT, b"data: [DONE]\n\n"], then=then)
    assert result.ok, result.error
    assert result.start < result.chunk_times[0] <= result.end
