"""The non-generation routes: /health, /version, /v1/models, /tokenize, /detokenize, /openapi.json, /docs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchlm import __version__
from batchlm.server.background import BackgroundServer
from fake_engine import FakeEngine, FakeTokenizer, openai_client

TOKENIZER = FakeTokenizer()


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(FakeEngine(max_model_len=300)) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


def test_health_and_version(http: httpx.Client) -> None:
    health = http.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert http.get("/version").json() == {"version": __version__}


def test_models_list_and_retrieve(server: BackgroundServer) -> None:
    client = openai_client(server.base_url)
    [model] = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("fake-model", "model", "batchlm")
    assert model.model_extra == {"max_model_len": 300}
    assert client.models.retrieve("fake-model").id == "fake-model"
    assert client.models.retrieve("default").id == "fake-model"


def test_tokenize_a_prompt(http: httpx.Client) -> None:
    body = http.post("/tokenize", json={"prompt": "abc"}).json()
    expected = {"tokens": TOKENIZER.encode("abc"), "count": 4, "max_model_len": 300, "token_strs": None}
    assert body == expected
    plain = http.post("/tokenize", json={"prompt": "abc", "add_special_tokens": False}).json()
    assert plain["tokens"] == TOKENIZER.encode("abc", add_special_tokens=False)


def test_tokenize_messages_uses_the_chat_template(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "hi"}]
    body = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert body["tokens"] == TOKENIZER.apply_chat_template(messages, add_generation_prompt=False)
    assert body["count"] == len(body["tokens"])


@pytest.mark.parametrize(
    "request_body", [{}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}]
)
def test_tokenize_needs_exactly_one_input(http: httpx.Client, request_body: dict[str, Any]) -> None:
    response = http.post("/tokenize", json=request_body)
    assert response.status_code == 400
    assert "exactly one" in response.json()["error"]["message"]


def test_detokenize(http: httpx.Client) -> None:
    tokens = TOKENIZER.encode("héllo")
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "<s>héllo"}
    bad = http.post("/detokenize", json={"tokens": [1, 100_000]})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tokens"


def test_openapi_and_docs(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
    ):
        assert path in schema["paths"]
    chat_fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "temperature", "top_k", "stream_options"} <= set(chat_fields)
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
