"""The reliability suite: a seeded fuzz run of request bodies generated from the server's OpenAPI
schema (no 5xx, every error in OpenAI's shape), then against the real engine on the tiny model: 50
mid-stream disconnects that leave nothing behind, overload answered by 429 with Retry-After, and the
hostile inputs of the hardening issue."""

from __future__ import annotations

import asyncio
import collections
import json
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, wait_until
from openapi_fuzz import request_bodies

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=50,
    derandomize=True,  # seeded: the same cases on every run
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


def assert_error_shape(payload: Any) -> None:
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)


def assert_well_formed(response: httpx.Response) -> None:
    """No 5xx; an error is OpenAI's shape; a success is valid JSON or SSE whose error events are too."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_error_shape(response.json())
        return
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        response.json()
        return
    payloads = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    if response.request.url.path.endswith("/responses"):
        assert_responses_stream([json.loads(payload) for payload in payloads])
        return
    assert payloads and payloads[-1] == "[DONE]"
    for payload in payloads[:-1]:
        event = json.loads(payload)
        if "error" in event:
            assert_error_shape(event)


def assert_responses_stream(events: list[Any]) -> None:
    """Typed events numbered in order, the last one ending the response; an error event in its shape."""
    assert events and [event["sequence_number"] for event in events] == list(range(len(events)))
    assert events[-1]["type"] in ("response.completed", "response.incomplete", "response.failed")
    for event in events:
        if event["type"] == "error":
            assert isinstance(event["message"], str) and event["message"] and "code" in event


# -- fuzz: generated bodies against a fast fake engine ------------------------------------------------


@pytest.fixture(scope="module")
def fake_server() -> Iterator[BackgroundServer]:
    with BackgroundServer(FakeEngine(max_model_len=64)) as running:
        yield running


@pytest.fixture(scope="module")
def fuzz_client(fake_server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_server.base_url, timeout=60) as client:
        yield client


VALID_BODIES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"prompt": "hi", "max_tokens": 4},
    "/v1/responses": {"input": "hi", "max_output_tokens": 4},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [70, 71]},
}


@pytest.mark.parametrize("path", list(VALID_BODIES))
def test_generated_bodies_never_get_a_5xx(
    fake_server: BackgroundServer, fuzz_client: httpx.Client, path: str
) -> None:
    openapi = fake_server.app.openapi()
    statuses: collections.Counter[int] = collections.Counter()

    @FUZZ
    @given(body=request_bodies(openapi, path, VALID_BODIES[path]))
    def check(body: Any) -> None:
        # allow_nan: NaN and Infinity go out as bare tokens; lone surrogates as \\uXXXX escapes.
        content = json.dumps(body, allow_nan=True).encode()
        response = fuzz_client.post(path, content=content, headers={"content-type": "application/json"})
        statuses[response.status_code] += 1
        assert_well_formed(response)

    check()
    # The cases reach past validation too: some are served, not only refused.
    assert statuses[200] > 0 and statuses[400] > 0, statuses
    assert fuzz_client.get("/health").status_code == 200


@pytest.mark.parametrize("path", list(VALID_BODIES)[:3])
def test_a_stream_of_each_generation_endpoint_is_well_formed(fuzz_client: httpx.Client, path: str) -> None:
    """The fuzz draws `stream` at random; each endpoint's stream is checked here whatever it draws."""
    response = fuzz_client.post(path, json={**VALID_BODIES[path], "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert_well_formed(response)


@FUZZ
@given(model_id=st.text(max_size=20) | st.sampled_from(["%ED%A0%80", "..%2F..", "fake-model", "a/b/c"]))
def test_generated_model_ids_never_get_a_5xx(fuzz_client: httpx.Client, model_id: str) -> None:
    response = fuzz_client.get("/v1/models/" + urllib.parse.quote(model_id, safe="/%"))
    if response.status_code != 200:
        assert_error_shape(response.json())
    assert response.status_code < 500


# -- the real engine on the tiny model ----------------------------------------------------------------

MAX_NUM_SEQS = 2
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def engine_server(tiny_model_dir: Callable[..., Path]) -> Iterator[BackgroundServer]:
    config = EngineConfig(
        model=str(tiny_model_dir("llama")), device="cpu", max_num_seqs=MAX_NUM_SEQS, max_model_len=128
    )
    engine = AsyncLLMEngine(config, max_queue=MAX_QUEUE, multiprocess=False)
    settings = ServerSettings(max_queue=MAX_QUEUE, max_n=2)
    running = BackgroundServer(engine, settings, start_engine=engine.start).start()
    running.wait_until_ready(180)
    yield running
    running.stop()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_generated_bodies_against_the_real_engine(engine_server: BackgroundServer, path: str) -> None:
    """Fewer cases than against the fake (each one served runs the model), but through the real
    sampling parameters, sampler and detokenizer."""
    openapi = engine_server.app.openapi()
    valid = {**VALID_BODIES[path], "model": None}
    statuses: collections.Counter[int] = collections.Counter()

    with httpx.Client(base_url=engine_server.base_url, timeout=120) as client:

        @settings(FUZZ, max_examples=20)
        @given(body=request_bodies(openapi, path, valid).map(bounded))
        def check(body: Any) -> None:
            content = json.dumps(body, allow_nan=True).encode()
            response = client.post(path, content=content, headers={"content-type": "application/json"})
            statuses[response.status_code] += 1
            assert_well_formed(response)

        check()
    assert statuses[200] > 0, statuses
    wait_until(lambda: engine_is_idle(engine_server), 60, "the engine to finish the fuzz requests")


def bounded(body: Any) -> Any:
    """`body` with any completion it may be served kept short: the model is slow on a loaded CPU, and
    a body without max_tokens would run to the end of the context (the fake-engine run covers that)."""
    if not isinstance(body, dict):
        return body
    budget = "max_output_tokens" if "input" in body else "max_tokens"
    requested = body.get(budget)
    if requested is None or (isinstance(requested, int) and 8 < requested < 1000):
        return {**body, budget: 8}
    return body


def engine_is_idle(server: BackgroundServer) -> bool:
    stats = server.engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


LONG_STREAM = {"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True, "stream": True}


async def _disconnect_after_first_token(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/v1/completions", json=LONG_STREAM) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return  # hang up mid-stream


def test_50_mid_stream_disconnects_leave_nothing_behind(engine_server: BackgroundServer) -> None:
    async def waves() -> None:
        for _ in range(25):  # two at a time: the batch, so none is refused as overload
            async with httpx.AsyncClient(base_url=engine_server.base_url, timeout=60) as client:
                await asyncio.gather(*(_disconnect_after_first_token(client) for _ in range(MAX_NUM_SEQS)))

    asyncio.run(waves())
    wait_until(lambda: engine_is_idle(engine_server), 60, "the engine to drop every disconnected stream")
    assert httpx.get(f"{engine_server.base_url}/health").status_code == 200


def test_overload_is_429_with_retry_after(engine_server: BackgroundServer) -> None:
    """With the batch running and the queue full (long streams held open), every further request
    gets a 429 that says when to retry; once the streams go, the engine is idle again."""

    async def overload() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=engine_server.base_url, timeout=120) as client:
            holders = [asyncio.ensure_future(_hold_stream(client)) for _ in range(MAX_NUM_SEQS + MAX_QUEUE)]
            while engine_server.engine.stats().num_waiting < MAX_QUEUE:
                await asyncio.sleep(0.02)
            body = {"prompt": "one more", "max_tokens": 2}
            refused = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(4)))
            for holder in holders:
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return refused

    for response in asyncio.run(overload()):
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert_error_shape(response.json())
        assert response.json()["error"]["message"].lower().count("overloaded") == 1
    wait_until(lambda: engine_is_idle(engine_server), 60, "the engine to drop the held streams")


async def _hold_stream(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/v1/completions", json=LONG_STREAM) as response:
        async for _ in response.aiter_lines():
            pass


HOSTILE: list[tuple[str, str, bytes, int]] = [
    ("POST", "/v1/completions", b'{"prompt": "\\ud800x\\udfff"}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800x\\udfff"}]}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"}', 400),
    ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400),
    ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": "NaN"}', 400),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"documents": {"a": 1}}}', 400),
    ("POST", "/v1/completions", b'{"prompt": "hi", "n": 3}', 400),
    ("POST", "/detokenize", b"", 400),
    ("GET", "/v1/completions", b"", 405),
    ("GET", "/v1/models/%ED%A0%80", b"", 404),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}', 400),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "content", "status"), HOSTILE)
def test_hostile_requests_are_4xx_in_openai_shape(
    engine_server: BackgroundServer, method: str, path: str, content: bytes, status: int
) -> None:
    response = httpx.request(
        method, f"{engine_server.base_url}{path}", content=content,
        headers={"content-type": "application/json"}, timeout=60,
    )  # fmt: skip
    assert response.status_code == status, response.text
    assert_error_shape(response.json())
    assert httpx.get(f"{engine_server.base_url}/health").status_code == 200


def test_a_prompt_batch_the_server_can_never_hold_whole_is_a_400(engine_server: BackgroundServer) -> None:
    # At most MAX_NUM_SEQS running plus MAX_QUEUE waiting: a bigger batch would get a 429 on an idle
    # server, and a client that retries on 429 would retry it forever.
    most = MAX_NUM_SEQS + MAX_QUEUE
    with httpx.Client(base_url=engine_server.base_url, timeout=120) as client:
        too_many = client.post("/v1/completions", json={"prompt": ["a"] * (most + 1), "max_tokens": 2})
        assert too_many.status_code == 400, too_many.text
        error = too_many.json()["error"]
        assert error["param"] == "prompt" and f"at most {most}" in error["message"]
        whole = client.post("/v1/completions", json={"prompt": ["a"] * most, "max_tokens": 2})
        assert whole.status_code == 200, whole.text
        assert len(whole.json()["choices"]) == most
    wait_until(lambda: engine_is_idle(engine_server), 60, "the engine to finish the batch")
