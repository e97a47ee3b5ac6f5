"""SSE framing: events must come out the same however the network splits the bytes."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from batchlm.bench.sse import SSEEvent, SSEParser


def feed_all(parts: list[bytes]) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for part in parts:
        events.extend(parser.feed(part))
    return events, parser


STREAM = (
    b": keep-alive\r\n\r\n"
    b'data: {"a": 1}\r\n\r\n'
    b"event: error\r\ndata: line one\r\ndata: line two\r\n\r\n"
    b"data:no-space\n\n"
    b"id: 7\nretry: 10\ndata: x\r\r"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent('{"a": 1}'),
    SSEEvent("line one\nline two", event="error"),
    SSEEvent("no-space"),
    SSEEvent("x"),
    SSEEvent("[DONE]"),
]


def test_whole_stream_parses_into_events_with_comments_dropped() -> None:
    events, parser = feed_all([STREAM])
    assert events == EXPECTED
    assert parser.pending_bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_of_the_bytes_gives_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    parts = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    events, parser = feed_all(parts)
    assert events == EXPECTED
    assert parser.pending_bytes == 0


def test_crlf_split_between_reads_is_one_line_end() -> None:
    events, _ = feed_all([b"data: a\r", b"\n\r", b"\n"])
    assert events == [SSEEvent("a")]


def test_event_without_terminating_blank_line_stays_pending() -> None:
    events, parser = feed_all([b'data: {"a": 1}\n\ndata: {"trunc'])
    assert events == [SSEEvent('{"a": 1}')]
    assert parser.pending_bytes == len(b'data: {"trunc')
    events, parser = feed_all([b"data: complete line\n"])
    assert events == []
    assert parser.pending_bytes > 0


def test_blank_lines_and_comment_only_blocks_dispatch_nothing() -> None:
    events, _ = feed_all([b"\n\n: ping\n\n:\n\nevent: noise\n\n"])
    assert events == []


def test_utf8_split_inside_a_character_is_reassembled() -> None:
    payload = "data: héllo ✓\n\n".encode()
    cut = payload.index("✓".encode()) + 1
    events, _ = feed_all([payload[:cut], payload[cut:]])
    assert events == [SSEEvent("héllo ✓")]


def test_finish_hands_over_a_last_event_the_body_ended_without_a_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a": 1}\n\ndata: [DONE]\n') == [SSEEvent('{"a": 1}')]
    assert parser.finish() == [SSEEvent("[DONE]")]
    assert parser.pending_bytes == 0
    assert parser.finish() == []  # nothing twice, and a body that ended cleanly has nothing left


def test_an_error_field_line_is_an_error_event() -> None:
    """llama.cpp's llama-server sends a failure as `error: {...}`, a field the SSE rules ignore; it was
    dropped, and the data: [DONE] after it made the failed request a success."""
    events, _ = feed_all([b'data: {"a": 1}\n\nerror: {"code": 500, "message": "boom"}\n\ndata: [DONE]\n\n'])
    assert events == [
        SSEEvent('{"a": 1}'),
        SSEEvent('{"code": 500, "message": "boom"}', event="error"),
        SSEEvent("[DONE]"),
    ]
