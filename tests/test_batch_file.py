"""A batch input file's lines checked before they run (`parse_line`: its fields, its JSON as deep as
the HTTP API reads a body, UTF-8 only), and the results written in input order (`OrderedWriter`),
those held for an earlier line included."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from pydantic import ValidationError

from batch_harness import line
from batchlm import json_text
from batchlm.batch_file import OrderedWriter, parse_line
from batchlm.server.protocol import ChatCompletionRequest


def test_lines_are_checked_before_they_run() -> None:
    seen: set[str] = set()
    ok = line("a", "/v1/completions", {"prompt": "x"})
    assert parse_line(ok, seen) == ("a", "/v1/completions", {"prompt": "x"})
    refusals = {
        "[]": "invalid_request",
        json.dumps({"url": "/v1/completions", "body": {}}): "invalid_request",
        json.dumps(
            {"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {}}
        ): "invalid_request",
        json.dumps({"custom_id": "c", "url": "/v1/completions", "body": "x"}): "invalid_request",
        ok: "duplicate_custom_id",
        # Past Python's recursion limit: a RecursionError once, which ended the whole run.
        '{"custom_id": "d", "body": ' + "[" * 5000 + "]" * 5000 + "}": "invalid_json",
    }
    for text, code in refusals.items():
        refused = parse_line(text, seen)
        assert isinstance(refused, dict) and refused["error"]["code"] == code and refused["response"] is None


def test_a_body_nested_as_deep_as_a_request_body_may_is_read() -> None:
    """The line's object wraps the body: the nesting bound (json_text.MAX_DEPTH, as deep as the HTTP
    API's reader takes a body) counts from the body, not from the line."""

    def body(depth: int) -> dict[str, Any]:
        value: Any = 1
        for _ in range(depth - 2):
            value = [value]
        return {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"x": value}}

    at_limit, past_it = body(json_text.MAX_DEPTH), body(json_text.MAX_DEPTH + 1)
    ChatCompletionRequest.model_validate_json(json.dumps(at_limit))  # as the HTTP API reads a body
    with pytest.raises(ValidationError, match="recursion limit"):
        ChatCompletionRequest.model_validate_json(json.dumps(past_it))
    url = "/v1/chat/completions"
    assert parse_line(line("a", url, at_limit), set()) == ("a", url, at_limit)
    refused = parse_line(line("b", url, past_it), set())
    assert isinstance(refused, dict) and refused["error"]["code"] == "invalid_json"
    assert f"more than {json_text.MAX_DEPTH} levels inside the line's own" in refused["error"]["message"]


def test_an_empty_array_at_the_bound_is_read_as_the_http_api_reads_it() -> None:
    """pydantic's reader counts an empty array as a value inside the arrays around it, not as a level
    of its own: such a body is read, one array deeper, over HTTP and from a batch file alike."""
    value: Any = []
    for _ in range(json_text.MAX_DEPTH - 2):
        value = [value]
    body = {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"x": value}}
    ChatCompletionRequest.model_validate_json(json.dumps(body))
    assert parse_line(line("a", "/v1/chat/completions", body), set()) == ("a", "/v1/chat/completions", body)
    body["chat_template_kwargs"] = {"x": [[value]]}
    with pytest.raises(ValidationError, match="recursion limit"):
        ChatCompletionRequest.model_validate_json(json.dumps(body))
    refused = parse_line(line("b", "/v1/chat/completions", body), set())
    assert isinstance(refused, dict) and refused["error"]["code"] == "invalid_json"


def test_results_are_written_in_input_order() -> None:
    out = io.StringIO()
    writer = OrderedWriter(out)
    writer.put(2, {"n": 2})
    writer.put(1, {"n": 1})
    assert out.getvalue() == ""
    writer.put(0, {"n": 0})
    assert [json.loads(text)["n"] for text in out.getvalue().splitlines()] == [0, 1, 2]


def test_a_custom_id_escaping_a_lone_surrogate_is_written_back_as_that_escape() -> None:
    # json.loads takes "\ud800" in a custom_id; the UTF-8 output cannot hold it, and the run stopped
    # there with a traceback. Its line is written in escapes, the others keep their characters.
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    writer = OrderedWriter(out)
    ids = ["東京", json.loads('"a\\ud800"'), "b"]
    for index, custom_id in enumerate(ids):
        writer.put(index, {"custom_id": custom_id})
    text = raw.getvalue().decode("utf-8")
    assert [json.loads(entry)["custom_id"] for entry in text.splitlines()] == ids
    assert '"東京"' in text and '"a\\ud800"' in text


def test_results_held_for_an_earlier_line_are_written_when_the_run_stops() -> None:
    out = io.StringIO()
    writer = OrderedWriter(out)
    writer.put(3, {"n": 3})
    writer.put(1, {"n": 1})
    writer.write_held()
    assert [json.loads(text)["n"] for text in out.getvalue().splitlines()] == [1, 3]


def test_a_line_in_utf16_is_not_read_as_json_would_read_it() -> None:
    # json.loads takes UTF-16 and UTF-32 bytes too: the first line of a UTF-16 file ran, the rest failed.
    text = line("a", "/v1/completions", {"prompt": "x"})
    utf16 = parse_line(b"\xff\xfe" + text.encode("utf-16-le"), set())
    assert isinstance(utf16, dict) and utf16["error"]["code"] == "invalid_json"
    assert utf16["error"]["message"].startswith("the line is not UTF-8")
    utf32 = parse_line(text.encode("utf-32-be"), set())  # valid UTF-8 (NULs), so not JSON
    assert isinstance(utf32, dict) and utf32["error"]["code"] == "invalid_json"
    assert parse_line(b"\xef\xbb\xbf" + text.encode(), set()) == ("a", "/v1/completions", {"prompt": "x"})
