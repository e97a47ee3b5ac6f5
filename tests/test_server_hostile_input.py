"""Hostile or malformed client input gets an OpenAI-shaped 4xx (never a 500), through both the fast
generation path and FastAPI's: invalid Unicode, non-finite numbers, failing chat templates, a missing
body, auth-scheme spelling, and the headers that 405 and 429 answers carry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchlm.engine.client import QueueFullError
from batchlm.server.background import BackgroundServer
from batchlm.server.errors import engine_error_to_api_error, error_body
from batchlm.server.state import ServerSettings
from error_shape import error_of
from fake_engine import FakeEngine, FakeTokenizer

LONE_SURROGATES = b'"\\ud800x\\udfff"'  # as JSON escapes: Python's json module decodes them as they are
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(FakeEngine(max_model_len=64)) as running:
        yield running


def post_raw(
    server: BackgroundServer, path: str, content: bytes, headers: dict[str, str] = JSON
) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b'{"prompt": %s}', "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", %s]}', "prompt[1]"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": %s}]}', "messages[0].content"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}',
            "messages[0].content[0].text",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": %s}', "model"),
        ("/v1/completions", b'{"prompt": "hi", "stop": [%s]}', "stop[0]"),
        ("/tokenize", b'{"prompt": %s}', "prompt"),
        ("/v1/responses", b'{"input": %s}', "input"),
        # Named by the field's JSON name, not batchlm's attribute for it (json_).
        ("/v1/completions", b'{"prompt": "hi", "structured_outputs": {"json": {"const": %s}}}',
         "structured_outputs.json.const"),
        ("/v1/responses", b'{"input": [{"role": "user", "content": [{"type": "input_text", "text": %s}]}]}',
         "input[0].content[0].text"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_400_naming_the_field(
    server: BackgroundServer, path: str, body: bytes, param: str
) -> None:
    error = error_of(post_raw(server, path, body % LONE_SURROGATES), 400)
    assert error["param"] == param
    assert "surrogate" in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses"])
def test_a_top_level_key_with_a_lone_surrogate_is_400_saying_so(server: BackgroundServer, path: str) -> None:
    # Not "the body must be a JSON object": it is one, with a key that is not valid Unicode.
    error = error_of(post_raw(server, path, b'{"prompt": "hi", %s: 1}' % LONE_SURROGATES), 400)
    assert "surrogate" in error["message"] and "JSON object" not in error["message"]


def test_an_unknown_model_named_with_surrogates_is_404_with_an_encodable_body(
    server: BackgroundServer,
) -> None:
    error = error_of(httpx.get(f"{server.base_url}/v1/models/%ED%A0%80x"), 404)
    assert error["code"] == "model_not_found"


def test_error_bodies_encode_whatever_text_they_echo() -> None:
    body = error_body(404, "The model '\ud800x\udfff' does not exist.", "\udfff")
    assert body["error"]["message"] == "The model '\\ud800x\\udfff' does not exist."
    assert body["error"]["param"] == "\\udfff"


@pytest.mark.parametrize("value", [b"NaN", b'"NaN"', b"Infinity", b"-Infinity", b'"inf"', b"1e999"])
@pytest.mark.parametrize(
    ("path", "template", "param"),
    [
        ("/v1/completions", b'{"prompt": "hi", "temperature": %s}', "temperature"),
        ("/v1/completions", b'{"prompt": "hi", "top_p": %s}', "top_p"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": %s}',
         "presence_penalty"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7": %s}}',
         "logit_bias.7"),
        ("/v1/responses", b'{"input": "hi", "temperature": %s}', "temperature"),
    ],
)  # fmt: skip
def test_non_finite_numbers_are_400(
    server: BackgroundServer, path: str, template: bytes, param: str, value: bytes
) -> None:
    error = error_of(post_raw(server, path, template % value), 400)
    assert error["param"] == param
    assert "finite" in error["message"]


def test_a_chat_template_that_raises_anything_is_400(tiny_model_dir: Any) -> None:
    from batchlm.tokenizer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(Path(tiny_model_dir("llama")))
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"documents": {"a": 1}},  # transformers raises TypeError for this
    }
    with BackgroundServer(FakeEngine(tokenizer=tokenizer)) as server:
        for path in ("/v1/chat/completions", "/tokenize"):
            response = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
            error = error_of(response, 400)
            assert error["message"].startswith("Could not apply the chat template")


@pytest.mark.parametrize("content", [b"", None])
def test_an_empty_detokenize_body_names_the_missing_parameter(
    server: BackgroundServer, content: bytes | None
) -> None:
    headers = JSON if content is not None else {}
    error = error_of(post_raw(server, "/detokenize", content or b"", headers), 400)
    assert error["param"] == "tokens"
    assert "'tokens'" in error["message"]


def test_an_empty_chat_body_names_messages(server: BackgroundServer) -> None:
    error = error_of(post_raw(server, "/v1/chat/completions", b""), 400)
    assert error["param"] == "messages"


def test_405_names_the_allowed_methods(server: BackgroundServer) -> None:
    response = httpx.get(f"{server.base_url}/v1/chat/completions")
    error_of(response, 405)
    assert response.headers["allow"] == "POST"


def test_429_carries_retry_after_and_says_overloaded_once() -> None:
    with BackgroundServer(FakeEngine(max_in_flight=0)) as server:
        for path, body in (
            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}'),
            ("/v1/completions", b'{"prompt": "hi", "stream": true}'),
        ):
            response = post_raw(server, path, body)
            error = error_of(response, 429)
            assert int(response.headers["retry-after"]) >= 1
            assert error["message"].lower().count("overloaded") == 1


def test_the_front_ends_queue_full_message_says_overloaded_once() -> None:
    reason = "the server is overloaded: 9 requests are already waiting (--max-queue 8); retry later"
    error = engine_error_to_api_error(QueueFullError(reason))
    assert error is not None and error.status == 429
    assert error.message.lower().count("overloaded") == 1
    assert error.headers["Retry-After"] == "1"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    with BackgroundServer(FakeEngine(), ServerSettings(api_key="sk-right")) as server:
        url = f"{server.base_url}/v1/models"
        assert httpx.get(url, headers={"authorization": f"{scheme} sk-right"}).status_code == 200
        assert httpx.get(url, headers={"authorization": f"{scheme} sk-wrong"}).status_code == 401
        assert httpx.get(url, headers={"authorization": "Basic sk-right"}).status_code == 401


def test_n_is_capped_by_max_n() -> None:
    with BackgroundServer(FakeEngine(), ServerSettings(max_n=4)) as server:
        url = f"{server.base_url}/v1/completions"
        assert httpx.post(url, json={"prompt": "hi", "n": 4, "max_tokens": 1}).status_code == 200
        error = error_of(httpx.post(url, json={"prompt": "hi", "n": 5}), 400)
        assert error["param"] == "n" and "--max-n" in error["message"]
        chat = {"messages": [{"role": "user", "content": "hi"}], "n": 5}
        assert error_of(httpx.post(f"{server.base_url}/v1/chat/completions", json=chat), 400)["param"] == "n"


class CountingTokenizer(FakeTokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded += 1
        return super().encode(text, add_special_tokens)


class EngineHoldingTwo(FakeEngine):
    def most_requests_at_once(self) -> int | None:
        return 2


def test_a_batch_the_server_can_never_hold_is_refused_before_its_prompts_are_handled() -> None:
    """A body of a million tiny prompts fits the size limit: it must be counted, not tokenized and
    validated prompt by prompt on the event loop, before it is refused."""
    tokenizer = CountingTokenizer()
    engine = EngineHoldingTwo(tokenizer=tokenizer)
    with BackgroundServer(engine) as server:
        url = f"{server.base_url}/v1/completions"
        error = error_of(httpx.post(url, json={"prompt": ["a", "b", "c"], "max_tokens": 1}), 400)
        assert error["param"] == "prompt" and "at most 2" in error["message"]
        assert tokenizer.encoded == 0
        # Token-id prompts are not validated one by one either: the out-of-range id goes unread.
        error = error_of(httpx.post(url, json={"prompt": [[5], [6], [10**9]], "max_tokens": 1}), 400)
        assert "at most 2" in error["message"]
        assert engine.calls == []
        served = httpx.post(url, json={"prompt": ["a", "b"], "max_tokens": 1})
        assert served.status_code == 200 and len(served.json()["choices"]) == 2
        assert len(engine.calls) == 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "n": None,
                "stream": None,
                "logprobs": None,
                "min_tokens": None,
                "ignore_eos": None,
            },
        ),
        (
            "/v1/completions",
            {"prompt": "hi", "n": None, "stream": None, "echo": None, "skip_special_tokens": None},
        ),
        ("/v1/responses", {"input": "hi", "stream": None}),
        ("/tokenize", {"prompt": "hi", "add_special_tokens": None}),
    ],
)
def test_null_optional_fields_take_their_defaults(
    server: BackgroundServer, path: str, body: dict[str, Any]
) -> None:
    # OpenAI declares these "integer or null" / "boolean or null"; clients that write every unset field
    # send null, which means the default (one choice, not streamed, no logprobs), never a 400.
    body = {**body, "max_tokens": 4} if path in ("/v1/chat/completions", "/v1/completions") else body
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    choices = response.json().get("choices")
    assert choices is None or len(choices) == 1


def test_null_still_fails_a_required_field(server: BackgroundServer) -> None:
    error = error_of(httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": None}), 400)
    assert error["param"] == "messages"


DEEP = "[" * 5000 + "]" * 5000  # past Python's recursion limit: json.loads raises RecursionError
HUGE_NUMBER = '{"type": "integer", "minimum": ' + "1" * 5000 + "}"  # past int's 4300 digits: ValueError


@pytest.mark.parametrize(
    ("path", "body", "param", "reason"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "guided_json": DEEP},
         "guided_json", "nest more than 200 levels"),
        ("/v1/completions", {"prompt": "hi", "structured_outputs": {"json": DEEP}}, "structured_outputs",
         "nest more than 200 levels"),
        ("/v1/completions", {"prompt": "hi", "guided_json": HUGE_NUMBER}, "guided_json", "not valid JSON"),
    ],
)  # fmt: skip
def test_a_schema_text_too_deep_or_with_too_long_a_number_is_400(
    server: BackgroundServer, path: str, body: dict[str, Any], param: str, reason: str
) -> None:
    error = error_of(httpx.post(f"{server.base_url}{path}", json=body, timeout=30), 400)
    assert error["param"] == param
    assert reason in error["message"]


def test_tool_call_arguments_nested_too_deep_are_history_text(server: BackgroundServer) -> None:
    """Sent back as the text they are, as arguments that are no JSON object are, in chat and in the
    Responses API's function_call items (which become chat history)."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": DEEP}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    items = [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": DEEP},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
    ]
    for path, body in [
        ("/tokenize", {"messages": messages}),
        ("/v1/chat/completions", {"messages": messages, "max_tokens": 2}),
        ("/v1/responses", {"input": items, "max_output_tokens": 2}),
    ]:
        response = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
        # The fake engine's context is short: the text is too long for it, which is a 400 too.
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400:
            assert error_of(response, 400)["code"] == "context_length_exceeded"


def test_an_internal_error_says_the_connection_closes(
    server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn closes the connection after an error the app did not handle: the 500 says so, or a
    client reusing the connection gets its next request reset."""
    from batchlm.server import routes

    def broken(_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(routes, "tokenizer_info", broken)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        response = client.get("/tokenizer_info")
        error_of(response, 500)
        assert response.headers["connection"] == "close"
        assert client.get("/health").status_code == 200
