"""The stored responses of /v1/responses: a chain read back oldest first, the conversations continued
least recently removed whole beyond the capacity, branches, ids that are not the server's never looked up, and two stores (two API-server processes) on
one directory; their items found by id and removed with them, and a database of the first schema
upgraded in place."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from batchlm.server.response_store import NewResponse, ResponseStore, StoredResponse


def rid(n: int) -> str:
    return f"resp_{n:032x}"


def turn(n: int, previous: int | None = None) -> StoredResponse:
    output = [{"type": "message", "id": f"msg_a{n}", "role": "assistant", "content": f"a{n}"}]
    previous_id = None if previous is None else rid(previous)
    # The input item as the store keeps it (OpenAI's form: an id, the text as parts, a status).
    question = {"type": "message", "id": f"msg_q{n}", "role": "user", "status": "completed",
                "content": [{"type": "input_text", "text": f"q{n}"}]}  # fmt: skip
    return StoredResponse(previous_id, [question], {"id": rid(n), "output": output})


def text(item: dict[str, Any]) -> str:
    content = item["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def put(store: ResponseStore, n: int, previous: int | None = None) -> None:
    stored = turn(n, previous)
    store.put([NewResponse(rid(n), stored.previous_id, stored.input_items, json.dumps(stored.response))])


def test_a_chain_reads_back_oldest_first(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=10)
    put(store, 1)
    put(store, 2, previous=1)
    put(store, 3, previous=2)
    conversation = store.conversation(rid(3))
    assert conversation is not None
    assert [text(item) for item in conversation] == ["q1", "a1", "q2", "a2", "q3", "a3"]
    assert store.get(rid(2)) == turn(2, previous=1)
    assert store.delete(rid(1)) and not store.delete(rid(1))
    assert store.conversation(rid(3)) is None, "a missing link loses the chain"


def test_the_oldest_beyond_the_capacity_are_removed(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=3)
    for n in range(10):
        put(store, n)
        kept = [m for m in range(n + 1) if store.get(rid(m)) is not None]
        assert kept == list(range(max(0, n - 2), n + 1))


def test_ids_that_are_not_the_servers_are_never_looked_up(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=10)
    put(store, 1)
    for bad in ("../secret", "resp_../../secret", "secret", "resp_" + "0" * 31 + "/", "' OR 1=1 --"):
        assert store.get(bad) is None and store.conversation(bad) is None and not store.delete(bad)
    assert store.get(rid(1)) is not None


def test_two_stores_on_one_directory_read_each_other(tmp_path: Path) -> None:
    first, second = ResponseStore(tmp_path, capacity=3), ResponseStore(tmp_path, capacity=3)
    put(first, 1)
    put(second, 2, previous=1)
    conversation = first.conversation(rid(2))
    assert conversation is not None and [text(item) for item in conversation][:2] == ["q1", "a1"]
    # The capacity counts the responses of every process: the least recent go, whoever wrote them.
    put(first, 3)
    put(second, 4)
    assert first.get(rid(1)) is None and first.get(rid(2)) is None
    assert second.get(rid(3)) is not None and second.delete(rid(3)) and first.get(rid(3)) is None
    first.close()
    second.close()


def contents(store: ResponseStore, n: int) -> list[str] | None:
    conversation = store.conversation(rid(n))
    return None if conversation is None else [text(item) for item in conversation]


def test_a_conversation_that_goes_on_outlives_the_capacity_while_idle_ones_go_whole(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=4)
    put(store, 100)
    put(store, 101, previous=100)  # an idle conversation of two
    put(store, 1)
    for n in range(2, 10):  # an agent's session, longer than the capacity
        put(store, n, previous=n - 1)
        assert contents(store, n) == [text for m in range(1, n + 1) for text in (f"q{m}", f"a{m}")]
    assert store.get(rid(100)) is None and store.get(rid(101)) is None
    # Another conversation begins: the long one, now the least recent, goes whole.
    put(store, 200)
    assert (
        store.get(rid(9)) is None and store.get(rid(1)) is None and contents(store, 200) == ["q200", "a200"]
    )


def test_the_least_recently_continued_conversation_goes_first(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=4)
    put(store, 1)
    put(store, 10)
    put(store, 2, previous=1)  # the older conversation goes on
    put(store, 20)
    put(store, 30)
    assert store.get(rid(10)) is None, "the idle one went, though it began later"
    assert contents(store, 2) == ["q1", "a1", "q2", "a2"] and store.get(rid(20)) is not None


def test_branches_of_one_conversation_read_their_own_chains(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=10)
    put(store, 1)
    put(store, 2, previous=1)
    put(store, 3, previous=1)  # the same turn asked again
    put(store, 4, previous=3)
    assert contents(store, 2) == ["q1", "a1", "q2", "a2"]
    assert contents(store, 4) == ["q1", "a1", "q3", "a3", "q4", "a4"]
    assert store.delete(rid(3)) and store.conversation(rid(4)) is None and contents(store, 2) is not None
    # Which link went: the deleted turn, for the one after it; the response itself, where it is gone.
    assert (store.missing_link(rid(4)), store.missing_link(rid(3)), store.missing_link(rid(2))) == (
        rid(3),
        rid(3),
        None,
    )
    put(store, 5, previous=3)  # its previous deleted meanwhile: a conversation of its own
    assert contents(store, 5) is None and store.get(rid(5)) is not None


def test_responses_finishing_together_are_written_together(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=100)
    transactions: list[int] = []
    write = store.put

    def counted(responses: list[NewResponse]) -> None:
        transactions.append(len(responses))
        write(responses)

    store.put = counted  # type: ignore[method-assign]
    writes = store.writes

    async def finish_all() -> None:
        await asyncio.gather(*(writes.put(NewResponse(rid(n), None, [], "{}")) for n in range(20)))

    asyncio.run(finish_all())
    assert all(store.get(rid(n)) is not None for n in range(20))
    assert sum(transactions) == 20 and len(transactions) < 20, transactions


def test_a_failed_write_fails_every_response_waiting_on_it(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=100)
    store.close()  # every write now raises
    writes = store.writes

    async def finish_two() -> list[object]:
        return await asyncio.gather(
            *(writes.put(NewResponse(rid(n), None, [], "{}")) for n in range(2)), return_exceptions=True
        )

    assert all(isinstance(result, Exception) for result in asyncio.run(finish_two()))


def test_the_database_is_readable_by_its_owner_alone(tmp_path: Path) -> None:
    # A --responses-dir others may list and read: the conversations in it stay private.
    tmp_path.chmod(0o755)
    store = ResponseStore(tmp_path, capacity=10)
    put(store, 1)
    files = sorted(tmp_path.iterdir())
    assert {path.name for path in files} >= {"responses.sqlite3", "responses.sqlite3-wal"}
    for path in files:
        assert path.stat().st_mode & 0o077 == 0, (path.name, oct(path.stat().st_mode))
    store.close()


def test_items_are_indexed_by_id_and_go_with_their_response(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=2)
    put(store, 1)
    put(store, 2)
    bare = [
        {"role": "user", "content": "no id"},
        {"type": "function_call_output", "call_id": "c", "output": "x"},
    ]
    store.put([NewResponse(rid(3), rid(2), bare, json.dumps({"id": rid(3), "output": []}))])
    stored = store.get(rid(3))
    assert stored is not None
    given = [item["id"] for item in stored.input_items]
    assert given[0].startswith("msg_") and given[1].startswith("fco_")
    assert stored.input_items[0]["content"] == [{"type": "input_text", "text": "no id"}]
    found = store.items(["msg_q2", "msg_a2", *given, "msg_none"])
    assert set(found) == {"msg_q2", "msg_a2", *given} and found["msg_a2"]["content"] == "a2"
    assert store.delete(rid(2)) and store.items(["msg_q2", "msg_a2"]) == {}
    put(store, 4)
    put(store, 5)  # beyond the capacity: the conversations of 1 and of 3 go, with their items
    assert store.get(rid(1)) is None and store.items(["msg_q1", *given]) == {}
    assert set(store.items(["msg_q4", "msg_a5"])) == {"msg_q4", "msg_a5"}


def test_an_item_sent_again_is_found_as_last_stored(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=10)
    put(store, 1)
    sent_back = {"type": "message", "id": "msg_a1", "role": "assistant", "content": "a1, edited"}
    store.put([NewResponse(rid(2), rid(1), [sent_back], json.dumps({"id": rid(2), "output": []}))])
    assert store.items(["msg_a1"])["msg_a1"]["content"][0]["text"] == "a1, edited"
    assert store.delete(rid(2)) and store.items(["msg_a1"])["msg_a1"]["content"] == "a1"


def test_an_item_sent_twice_in_one_input_is_kept_under_two_ids(tmp_path: Path) -> None:
    """A page of input items ends at an id: were it twice in one input, paging would go round."""
    store = ResponseStore(tmp_path, capacity=10)
    twice = {"type": "message", "id": "msg_x", "role": "user", "content": "x"}
    store.put([NewResponse(rid(1), None, [twice, twice], json.dumps({"id": rid(1), "output": []}))])
    stored = store.get(rid(1))
    assert stored is not None
    first, second = (item["id"] for item in stored.input_items)
    assert first == "msg_x" and second.startswith("msg_") and second != first


def test_a_database_of_the_first_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    """A file written before items were indexed (no ids on input items): its responses keep being
    continued and read, their input items get ids once, and every item is found by its id."""
    old = sqlite3.connect(tmp_path / "responses.sqlite3")
    old.execute(
        "CREATE TABLE stored_responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
        "previous_id TEXT, conversation TEXT NOT NULL, body TEXT NOT NULL)"
    )
    old.execute("CREATE INDEX stored_responses_conversation ON stored_responses (conversation)")
    for n, previous in ((1, None), (2, 1)):
        output = [{"type": "message", "id": f"msg_a{n}", "role": "assistant", "content": f"a{n}"}]
        body = {
            "input_items": [{"role": "user", "content": f"q{n}"}],
            "response": {"id": rid(n), "output": output},
        }
        old.execute(
            "INSERT INTO stored_responses (id, previous_id, conversation, body) VALUES (?, ?, ?, ?)",
            (rid(n), None if previous is None else rid(previous), rid(1), json.dumps(body)),
        )
    old.commit()
    old.close()

    store = ResponseStore(tmp_path, capacity=10)
    assert contents(store, 2) == ["q1", "a1", "q2", "a2"]
    stored = store.get(rid(2))
    assert stored is not None and stored.input_items[0]["id"].startswith("msg_")
    question = stored.input_items[0]["id"]
    assert set(store.items([question, "msg_a1", "msg_a2"])) == {question, "msg_a1", "msg_a2"}
    put(store, 3, previous=2)
    assert contents(store, 3) == ["q1", "a1", "q2", "a2", "q3", "a3"]
    store.close()
    again = ResponseStore(tmp_path, capacity=10)  # upgraded once: the ids stay
    reread = again.get(rid(2))
    assert reread is not None and reread.input_items[0]["id"] == question
    assert again._db.execute("PRAGMA user_version").fetchone() == (1,)
    again.close()
