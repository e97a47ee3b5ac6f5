"""Every error status the server sends besides the 400s naming a field
(tests/test_server_error_fields.py), in OpenAI's shape {"error": {message, type, param, code}}: the
context length, the engine's refusal, 401, 404, 405, 413, 429, 500 and 503, a missing chat template,
and their counts in the metrics."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from batchlm.server.background import BackgroundServer
from batchlm.server.prompts import _log_no_chat_template
from batchlm.server.state import ServerSettings
from error_shape import error_of
from fake_engine import FakeEngine, metric_value, openai_client
from fake_tokenizer import FAKE_MODEL_PATH
from server_errors_harness import CHAT, MAX_BODY, USER, post


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=64)


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings(max_body_bytes=MAX_BODY)


def test_prompt_plus_max_tokens_over_the_context_is_400(server: BackgroundServer) -> None:
    error = error_of(post(server, "/v1/completions", {"prompt": "x" * 20, "max_tokens": 60}), 400)
    assert error["message"].startswith("This model's maximum context length is 64 tokens.")
    assert "21 in the prompt, 60 in the completion" in error["message"]
    assert error["code"] == "context_length_exceeded"
    error = error_of(
        post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 70}]}), 400
    )
    assert error["message"].startswith("This model's maximum context length is 64 tokens.")
    assert error["param"] == "messages"


def test_engine_rejection_is_400(server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reject_message = "the engine refuses this"
    try:
        error = error_of(post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}), 400)
        stream = error_of(
            post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}), 400
        )
    finally:
        engine.reject_message = None
    assert (
        error
        == stream
        == {
            "message": "the engine refuses this",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": None,
        }
    )


def test_unknown_model_is_404(server: BackgroundServer) -> None:
    client = openai_client(server.base_url)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert error_of(httpx.get(f"{server.base_url}/v1/models/gpt-4o"), 404)["code"] == "model_not_found"


def test_unknown_route_is_404_and_wrong_method_is_405(server: BackgroundServer) -> None:
    assert "/v1/nothing" in error_of(httpx.get(f"{server.base_url}/v1/nothing"), 404)["message"]
    assert "GET" in error_of(httpx.get(f"{server.base_url}/v1/chat/completions"), 405)["message"]


def test_body_over_the_limit_is_413(server: BackgroundServer) -> None:
    big = {"prompt": "x" * MAX_BODY, "max_tokens": 1}
    assert str(MAX_BODY) in error_of(post(server, "/v1/completions", big), 413)["message"]

    def chunked() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(8):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(
        f"{server.base_url}/v1/completions", content=chunked(), headers={"content-type": "application/json"}
    )
    error_of(response, 413)
    assert post(server, "/v1/completions", {"prompt": "fine", "max_tokens": 1}).status_code == 200


def test_internal_errors_are_500_without_details_and_the_server_keeps_serving(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.unexpected_error = RuntimeError("secret internals")
    try:
        error = error_of(post(server, "/v1/chat/completions", CHAT), 500)
    finally:
        engine.unexpected_error = None
    assert "secret" not in error["message"]
    assert error["type"] == "server_error"
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200
    text = httpx.get(f"{server.base_url}/metrics").text
    assert metric_value(text, "batchlm_requests_total", 'outcome="error_500"') == 1
    assert metric_value(text, "batchlm_requests_total", 'outcome="client_disconnect"') is None


def test_an_internal_error_is_logged_once_with_the_request_id(
    server: BackgroundServer, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine.unexpected_error = RuntimeError("an engine bug")
    try:
        with caplog.at_level("ERROR"):
            response = httpx.post(
                f"{server.base_url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-42"}
            )
            error_of(response, 500)
            # Served after the failed request's last step on the server's loop, uvicorn's logging of
            # the error it saw re-raised among them.
            assert httpx.get(f"{server.base_url}/health").status_code == 200
    finally:
        engine.unexpected_error = None
    tracebacks = [r for r in caplog.records if r.exc_info and "an engine bug" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert "trace-42" in tracebacks[0].getMessage()


def test_errors_are_counted_by_status(server: BackgroundServer) -> None:
    post(server, "/v1/chat/completions", {**CHAT, "n": 0})
    text = httpx.get(f"{server.base_url}/metrics").text
    assert (metric_value(text, "batchlm_requests_total", 'outcome="error_400"') or 0) >= 1


def test_no_chat_template_is_400_without_the_model_path(caplog: pytest.LogCaptureFixture) -> None:
    _log_no_chat_template.cache_clear()
    engine = FakeEngine()
    engine.tokenizer.has_chat_template = False
    with caplog.at_level("WARNING", logger="batchlm.server.prompts"), BackgroundServer(engine) as server:
        errors = [error_of(post(server, "/v1/chat/completions", CHAT), 400) for _ in range(2)]
    for error in errors:
        assert "no chat template" in error["message"] and "/v1/completions" in error["message"]
        assert FAKE_MODEL_PATH not in error["message"] and "--chat-template" not in error["message"]
        assert error["code"] == "no_chat_template"
    # The operator's detail goes to the log, once however many requests are refused.
    logged = [r.getMessage() for r in caplog.records if r.name == "batchlm.server.prompts"]
    assert len(logged) == 1 and FAKE_MODEL_PATH in logged[0] and "--chat-template" in logged[0]


def test_api_key_is_required_on_the_api_but_not_on_health_or_metrics() -> None:
    with BackgroundServer(FakeEngine(), ServerSettings(api_key="sk-right")) as server:
        missing = error_of(post(server, "/v1/chat/completions", CHAT), 401)
        assert "didn't provide an API key" in missing["message"]
        assert error_of(httpx.get(f"{server.base_url}/v1/models"), 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai_client(server.base_url, api_key="sk-wrong").models.list()
        assert httpx.post(f"{server.base_url}/tokenize", json={"prompt": "a"}).status_code == 401
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        assert httpx.get(f"{server.base_url}/metrics").status_code == 200
        assert httpx.get(f"{server.base_url}/version").status_code == 200
        good = openai_client(server.base_url, api_key="sk-right")
        assert good.chat.completions.create(model="fake-model", messages=USER, max_tokens=1).choices


def test_queue_full_is_429() -> None:
    with BackgroundServer(FakeEngine(max_in_flight=0)) as server:
        client = openai_client(server.base_url)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="fake-model", messages=USER)
        assert caught.value.status_code == 429
        streaming = error_of(post(server, "/v1/chat/completions", {**CHAT, "stream": True}), 429)
        assert streaming["type"] == "rate_limit_exceeded"


def test_loading_and_dead_engines_are_503() -> None:
    engine = FakeEngine(ready=False)
    with BackgroundServer(engine) as server:
        assert error_of(post(server, "/v1/chat/completions", CHAT), 503)["code"] == "model_loading"
        assert error_of(httpx.get(f"{server.base_url}/v1/models"), 503)["code"] == "model_loading"
        engine._ready = True
        assert post(server, "/v1/chat/completions", CHAT).status_code == 200
        engine.kill()
        assert error_of(post(server, "/v1/chat/completions", CHAT), 503)["type"] == "service_unavailable"
