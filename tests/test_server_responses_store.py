"""Stored responses of /v1/responses over HTTP: continued by `previous_response_id` (their instructions
not carried over), read back and deleted, kept out by `store: false`, shared by the processes of
`--api-servers N` through one directory, none with `--stored-responses 0`, and an answer that still
goes out when storing it fails."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import httpx
import openai
import pytest

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, openai_client
from responses_harness import REPLY, post


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096, reply=REPLY)


def test_a_stored_response_is_continued_by_its_id(client: Any, engine: FakeEngine) -> None:
    """As in OpenAI's API: the earlier turns come before the new input; their instructions do not."""
    engine.reply = REPLY
    first = client.responses.create(model="fake-model", input="My name is Ada.", instructions="Be brief.")
    second = client.responses.create(
        model="fake-model", input="What is my name?", previous_response_id=first.id, instructions="In French."
    )
    assert second.previous_response_id == first.id and second.store
    assert engine.tokenizer.last_chat["messages"] == [
        {"role": "system", "content": "In French."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "What is my name?"},
    ]
    with client.responses.stream(model="fake-model", input=[{"role": "user", "content": "And?"}],
                                 previous_response_id=second.id) as stream:  # fmt: skip
        third = stream.get_final_response()
    # The stream's response is stored before its last event: it can be continued at once.
    client.responses.create(model="fake-model", input="Bye.", previous_response_id=third.id)
    contents = [m["content"] for m in engine.tokenizer.last_chat["messages"]]
    assert contents == ["My name is Ada.", REPLY, "What is my name?", REPLY, "And?", REPLY, "Bye."]


def test_a_stored_response_is_read_back_and_deleted(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    created = client.responses.create(model="fake-model", input="hi")
    read = client.responses.retrieve(created.id)
    assert (read.id, read.output_text, read.status) == (created.id, REPLY, "completed")
    deleted = client.responses.delete(created.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="fake-model", input="more", previous_response_id=created.id)
    assert refused.value.body["code"] == "previous_response_not_found"


def test_streaming_a_stored_response_back_is_refused(client: Any, engine: FakeEngine) -> None:
    """Only background responses stream again; a JSON body would read as an empty stream."""
    engine.reply = REPLY
    created = client.responses.create(model="fake-model", input="hi")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.retrieve(created.id, stream=True)
    assert refused.value.body["param"] == "stream"
    with pytest.raises(openai.BadRequestError), client.responses.stream(response_id=created.id):
        pass
    assert client.responses.retrieve(created.id, stream=False).output_text == REPLY


def test_continuing_past_a_deleted_turn_names_the_turn(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    first = client.responses.create(model="fake-model", input="hi")
    second = client.responses.create(model="fake-model", input="more", previous_response_id=first.id)
    client.responses.delete(first.id)
    assert client.responses.retrieve(second.id).id == second.id  # itself still stored
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="fake-model", input="again", previous_response_id=second.id)
    body = refused.value.body
    assert body["code"] == "previous_response_not_found" and body["param"] == "previous_response_id"
    assert f"continues response '{first.id}', which is no longer stored" in body["message"]


def test_store_false_keeps_nothing(client: Any, server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reply = REPLY
    created = client.responses.create(model="fake-model", input="hi", store=False)
    assert created.store is False
    assert httpx.get(f"{server.base_url}/v1/responses/{created.id}").status_code == 404
    assert httpx.get(f"{server.base_url}/v1/responses/..%2F..%2Fetc%2Fpasswd").status_code == 404
    for bad in ("resp_x", "resp_..", "resp_" + "0" * 32):
        error = httpx.get(f"{server.base_url}/v1/responses/{bad}").json()["error"]
        assert error["code"] == "not_found" and error["param"] == "response_id"
        assert httpx.delete(f"{server.base_url}/v1/responses/{bad}").status_code == 404


def test_api_servers_sharing_a_directory_continue_each_other(tmp_path: Any) -> None:
    """Each process of --api-servers N stores into, and reads from, the directory they share."""
    settings = ServerSettings(responses_dir=str(tmp_path))
    first_engine, second_engine = FakeEngine(reply="One."), FakeEngine(reply="Two.")
    with (
        BackgroundServer(first_engine, settings) as first,
        BackgroundServer(second_engine, settings) as second,
    ):
        created = openai_client(first.base_url).responses.create(model="fake-model", input="a")
        openai_client(second.base_url).responses.create(
            model="fake-model", input="b", previous_response_id=created.id
        )
    assert [m["content"] for m in second_engine.tokenizer.last_chat["messages"]] == ["a", "One.", "b"]
    assert tmp_path.exists(), "a directory the operator named stays"


def test_no_stored_responses_refuses_previous_response_id() -> None:
    with BackgroundServer(FakeEngine(), ServerSettings(stored_responses=0)) as server:
        created = openai_client(server.base_url).responses.create(model="fake-model", input="a")
        assert created.store is False
        error = post(server, {"previous_response_id": created.id}).json()["error"]
        assert error["param"] == "previous_response_id" and "--stored-responses 0" in error["message"]


def test_a_store_that_fails_still_answers(
    client: Any, server: BackgroundServer, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Storing is logged in a line when it fails (a full disk); the answer itself still goes out,
    streamed or not, saying that it is not stored."""
    engine.reply = REPLY
    store = server.state.responses
    assert store is not None
    real_put = store.put

    def failing(_: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    store.put = failing  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.WARNING, logger="batchlm.server.serving_responses"):
            created = client.responses.create(model="fake-model", input="hi")
            with client.responses.stream(model="fake-model", input="hi") as stream:
                streamed = stream.get_final_response()
    finally:
        store.put = real_put  # type: ignore[method-assign]
    assert (created.output_text, streamed.output_text) == (REPLY, REPLY)
    assert created.store is False and streamed.store is False
    lines = [r for r in caplog.records if "not stored" in r.getMessage()]
    assert len(lines) == 2 and all("database or disk is full" in r.getMessage() for r in lines)
    assert all(r.exc_info is None for r in lines), "a line, not a traceback"


def test_a_database_that_cannot_be_read_or_changed_is_a_503(client: Any, server: BackgroundServer) -> None:
    """A full disk, or a lock another process holds past the timeout: said, not a 500."""
    created = client.responses.create(model="fake-model", input="hi")
    store = server.state.responses
    assert store is not None
    real = store.get, store.delete, store.conversation, store.items

    def failing(_: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    store.get = store.delete = store.conversation = store.items = failing  # type: ignore[method-assign]
    try:
        answers = [
            httpx.get(f"{server.base_url}/v1/responses/{created.id}"),
            httpx.get(f"{server.base_url}/v1/responses/{created.id}/input_items"),
            httpx.delete(f"{server.base_url}/v1/responses/{created.id}"),
            post(server, {"previous_response_id": created.id}),
            post(server, {"input": [{"type": "item_reference", "id": created.output[0].id}]}),
        ]
    finally:
        store.get, store.delete, store.conversation, store.items = real  # type: ignore[method-assign]
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert "database is locked" in answer.json()["error"]["message"]
    assert client.responses.retrieve(created.id).id == created.id
