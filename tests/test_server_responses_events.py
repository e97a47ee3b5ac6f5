"""The stream of POST /v1/responses, through the official openai client's stream helper and read raw:
its events in order, their text and logprobs, calls as argument deltas, a stream cut short, an engine
failing mid-stream, and a client leaving one."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, openai_client, wait_until
from responses_harness import FLAT_TOOLS, REPLY, THINKING_REPLY, events_of
from tools_harness import HERMES_REPLY, PARIS


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096, cached_tokens=3)


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings(reasoning_parser="think")


def test_a_stream_gives_what_the_response_gives(
    client: Any, server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = REPLY
    with client.responses.stream(model="fake-model", input="hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == REPLY and len(deltas) > 1
    assert final.output_text == REPLY and final.status == "completed"
    assert final.usage.output_tokens == len(REPLY)
    events = events_of(server, {"input": "hi"})
    names = [name for name, _ in events]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [payload["sequence_number"] for _, payload in events] == list(range(len(events)))
    assert all(payload["type"] == name for name, payload in events)
    ids = {payload["item_id"] for _, payload in events if "item_id" in payload}
    assert len(ids) == 1 and events[0][1]["response"]["status"] == "in_progress"


def test_streamed_text_that_json_escapes_arrives_whole(server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reply = 'Ünïcødé "quoted" \\ back\nslash\t\u2028 😀 </tool_call>'
    events = events_of(server, {"input": "hi"})
    assert "".join(p["delta"] for name, p in events if name == "response.output_text.delta") == engine.reply
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == engine.reply


def test_a_stream_cut_short_ends_incomplete(server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reply = REPLY
    events = events_of(server, {"input": "hi", "max_output_tokens": 4})
    name, last = events[-1]
    assert name == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"
    assert last["response"]["output"][0]["content"][0]["text"] == REPLY[:4]


def test_logprobs_come_with_the_include_streamed_and_not(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    include = ["message.output_text.logprobs"]
    plain = client.responses.create(model="fake-model", input="hi", top_logprobs=2)
    assert plain.output[0].content[0].logprobs == [], "top_logprobs alone asks for none, as in OpenAI's API"
    assert engine.calls[-1].params.logprobs is None
    whole = client.responses.create(model="fake-model", input="hi", top_logprobs=2, include=include)
    logprobs = whole.output[0].content[0].logprobs
    assert [entry.token for entry in logprobs] == list(REPLY)
    assert all(len(entry.top_logprobs) == 2 and entry.bytes for entry in logprobs)
    assert logprobs[0].logprob == pytest.approx(-0.25)
    with client.responses.stream(model="fake-model", input="hi", top_logprobs=2, include=include) as stream:
        events = list(stream)
    streamed = [entry for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    assert [entry.token for entry in streamed] == list(REPLY)
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert [entry.token for entry in done.logprobs] == list(REPLY)
    # Without thinking held back, each delta carries its own token's.
    assert all(len(e.logprobs) == 1 for e in events if e.type == "response.output_text.delta")


def test_logprobs_of_held_back_text_ride_on_the_next_delta(client: Any, engine: FakeEngine) -> None:
    engine.reply = THINKING_REPLY
    include = ["message.output_text.logprobs"]
    with client.responses.stream(model="fake-model", input="hi", include=include) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas[0].logprobs) > 1, "the thinking's tokens come with the answer's first delta"
    assert sum(len(e.logprobs) for e in deltas) == len(THINKING_REPLY) == final.usage.output_tokens
    whole = client.responses.create(model="fake-model", input="hi", include=include)
    assert len(whole.output[-1].content[0].logprobs) == len(THINKING_REPLY)


def test_a_streamed_call_arrives_as_argument_deltas(
    client: Any, server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = HERMES_REPLY
    with client.responses.stream(model="fake-model", input="Weather?", tools=FLAT_TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(fragments) == done.arguments and json.loads(done.arguments) == json.loads(PARIS)
    assert "tool_call" not in "".join(e.delta for e in events if e.type == "response.output_text.delta")
    [call] = [item for item in final.output if item.type == "function_call"]
    assert call.arguments == done.arguments and call.name == "get_weather"
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [item.type for item in added] == ["message", "function_call"]
    assert added[1].call_id == call.call_id and added[1].arguments == ""


def test_an_engine_failure_mid_stream_ends_with_error_and_failed_events() -> None:
    engine = FakeEngine(max_model_len=20_000, token_delay_s=0.01, reply="x" * 5000)
    with BackgroundServer(engine) as server:
        body = {"input": "hi", "stream": True}
        with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for line in lines:
                if "response.output_text.delta" in line and line.startswith("data: "):
                    break
            engine.unexpected_error = RuntimeError("secret internals")
            rest = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
        error, failed = rest[-2:]
        assert (
            error["type"] == "error" and error["code"] == "server_error" and "secret" not in error["message"]
        )
        assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
        assert failed["response"]["error"]["code"] == "server_error"
        assert failed["sequence_number"] == error["sequence_number"] + 1


def test_a_client_leaving_a_stream_aborts_the_request() -> None:
    engine = FakeEngine(max_model_len=20_000, token_delay_s=0.01, reply="x" * 5000)
    with BackgroundServer(engine) as server:
        client = openai_client(server.base_url)
        with client.responses.stream(model="fake-model", input="hi") as stream:
            for event in stream:
                if event.type == "response.output_text.delta":
                    break
        wait_until(lambda: len(engine.aborted) == 1 and engine.running == 0, what="the abort")
        assert len(server.state.in_flight) == 0
