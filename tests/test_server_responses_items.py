"""The items of stored responses over HTTP, through the official openai client: a response's input items
listed with ids a page at a time (GET /v1/responses/{id}/input_items, the client's cursor), input items
of type `item_reference` read as the stored items they name (outputs and inputs alike), unknown ids and
deleted responses, and POST /v1/responses/{id}/cancel (no background responses here)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, openai_client
from responses_harness import FLAT_TOOLS, THINKING_REPLY, THOUGHT
from tools_harness import HERMES_REPLY

# Thinking, text and a call: a reasoning, a message and a function_call item.
CALL_REPLY = THINKING_REPLY.replace("It is Paris.", HERMES_REPLY)


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings(reasoning_parser="think")


def rendered(engine: FakeEngine) -> tuple[Any, list[int]]:
    """What the last request gave the template, and the prompt it rendered."""
    return engine.tokenizer.last_chat, engine.calls[-1].prompt_token_ids


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
    {"type": "message", "role": "assistant", "content": "Let me look."},
    {
        "type": "function_call",
        "id": "fc_given",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": "{}",
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    {"role": "user", "content": "Thanks."},
]


def test_input_items_are_listed_with_ids_a_page_at_a_time(client: Any, engine: FakeEngine) -> None:
    engine.reply = "Sunny."
    created = client.responses.create(model="fake-model", input=CONVERSATION, tools=FLAT_TOOLS)
    # Every page the client's cursor fetches (two items each), newest first by default.
    listed = list(client.responses.input_items.list(created.id, limit=2))
    assert [item.type for item in listed] == [item.get("type", "message") for item in CONVERSATION][::-1]
    ids = [item.id for item in listed]
    assert len(set(ids)) == len(ids) and "fc_given" in ids, "an item's own id is kept"
    assert [i.split("_")[0] for i in ids] == ["msg", "fco", "fc", "msg", "msg", "msg"]
    oldest = client.responses.input_items.list(created.id, order="asc", limit=100)
    assert [item.id for item in oldest.data] == ids[::-1] and oldest.has_more is False
    # A message's text as parts, as OpenAI lists it; the client reads each item as its type.
    system, user, assistant = oldest.data[:3]
    assert (system.role, system.content[0].type, system.content[0].text) == (
        "system",
        "input_text",
        "Be brief.",
    )
    assert user.content[0].text == "Weather in Paris?" and user.status == "completed"
    assert (assistant.role, assistant.content[0].type) == ("assistant", "output_text")
    assert oldest.data[4].output == "sunny" and oldest.data[4].call_id == "call_1"

    page = client.responses.input_items.list(created.id, limit=4, order="asc", after=ids[-1])
    assert [item.id for item in page.data] == ids[::-1][1:5] and page.has_more is True
    assert (page.first_id, page.last_id) == (ids[-2], ids[1])
    last = client.responses.input_items.list(created.id, limit=4, order="asc", after=ids[1])
    assert [item.id for item in last.data] == [ids[0]] and last.has_more is False
    assert client.responses.input_items.list(created.id, include=["message.output_text.logprobs"]).data

    text_input = client.responses.create(model="fake-model", input="hi")
    [only] = client.responses.input_items.list(text_input.id).data
    assert only.type == "message" and only.id.startswith("msg_") and only.content[0].text == "hi"


@pytest.mark.parametrize(
    ("query", "param"),
    [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
     ({"order": "up"}, "order"), ({"after": "msg_unknown"}, "after")],
)  # fmt: skip
def test_input_items_queries_out_of_range_are_400s(
    server: BackgroundServer, client: Any, engine: FakeEngine, query: dict[str, Any], param: str
) -> None:
    engine.reply = "Sunny."
    created = client.responses.create(model="fake-model", input="hi")
    answer = httpx.get(f"{server.base_url}/v1/responses/{created.id}/input_items", params=query)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_item_references_read_as_the_items_they_name(client: Any, engine: FakeEngine) -> None:
    """Each kind (reasoning, message and function call output items; an input message) referenced
    renders the prompt that sending the items themselves does."""
    engine.reply = CALL_REPLY
    first = client.responses.create(model="fake-model", input="Weather in Paris?", tools=FLAT_TOOLS)
    reasoning, message, call = first.output
    assert (reasoning.type, message.type, call.type) == ("reasoning", "message", "function_call")
    [question] = client.responses.input_items.list(first.id).data
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    engine.reply = "Sunny."
    items = [{"role": "user", "content": "Weather in Paris?"}]
    items += [item.model_dump(exclude_none=True) for item in first.output]
    client.responses.create(model="fake-model", input=[*items, answer], tools=FLAT_TOOLS)
    sent = rendered(engine)
    assert sent[0]["messages"][2]["reasoning_content"] == THOUGHT
    # The client's type for a reference, and a bare {"id"} (OpenAI's type is optional there).
    references = [
        {"type": "item_reference", "id": question.id},
        {"type": "item_reference", "id": reasoning.id},
    ]
    references += [{"id": message.id}, {"type": "item_reference", "id": call.id}]
    second = client.responses.create(model="fake-model", input=[*references, answer], tools=FLAT_TOOLS)
    assert rendered(engine) == sent
    # The response stored them as the items themselves.
    listed = client.responses.input_items.list(second.id, order="asc").data
    assert [item.id for item in listed[:4]] == [question.id, reasoning.id, message.id, call.id]
    assert listed[3].arguments == call.arguments

    # The referencing response's items (its output sent back, kept under their ids) are referenced in
    # turn, in a stream too.
    again = [{"type": "item_reference", "id": item.id} for item in listed]
    with client.responses.stream(model="fake-model", input=again, tools=FLAT_TOOLS) as stream:
        stream.get_final_response()
    assert rendered(engine) == sent


def test_an_unknown_or_deleted_item_is_a_400_naming_the_item(client: Any, engine: FakeEngine) -> None:
    engine.reply = "Sunny."
    first = client.responses.create(model="fake-model", input="hi")
    [message] = first.output
    unknown = [{"type": "item_reference", "id": message.id}, {"type": "item_reference", "id": "msg_nope"}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="fake-model", input=unknown)
    body = refused.value.body
    assert (body["param"], body["message"]) == ("input[1].id", "Item with id 'msg_nope' not found.")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="fake-model", input=[{"type": "item_reference", "id": 3}])
    assert refused.value.body["param"] == "input[0].id"

    client.responses.delete(first.id)  # its items go with it
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="fake-model", input=unknown[:1])
    assert refused.value.body["param"] == "input[0].id"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(first.id)


def test_cancel_is_a_400_for_a_stored_response_and_a_404_for_none(
    server: BackgroundServer, client: Any, engine: FakeEngine
) -> None:
    engine.reply = "Sunny."
    created = client.responses.create(model="fake-model", input="hi")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(created.id)
    assert "background" in refused.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_" + "0" * 32)
    assert client.responses.retrieve(created.id).status == "completed", "a refused cancel changes nothing"
    # Other methods and sub-routes: a JSON 405 or 404.
    base = f"{server.base_url}/v1/responses/{created.id}"
    for method, url, status in [
        ("GET", f"{base}/cancel", 405),
        ("POST", f"{base}/input_items", 405),
        ("POST", base, 405),
        ("GET", f"{base}/bogus", 404),
        ("GET", f"{base}/input_items/x", 404),
    ]:
        answer = httpx.request(method, url)
        assert answer.status_code == status and answer.json()["error"]["message"], (method, url)


def test_no_stored_responses_refuses_item_references() -> None:
    with BackgroundServer(FakeEngine(), ServerSettings(stored_responses=0)) as server:
        client = openai_client(server.base_url)
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="fake-model", input=[{"type": "item_reference", "id": "msg_1"}])
        assert refused.value.body["param"] == "input[0].id"
        assert "--stored-responses 0" in refused.value.body["message"]
        with pytest.raises(openai.NotFoundError):
            client.responses.input_items.list("resp_" + "0" * 32)
        with pytest.raises(openai.NotFoundError):
            client.responses.cancel("resp_" + "0" * 32)
