"""The stored responses of /v1/responses: a chain read back oldest first, the oldest removed beyond the
capacity, ids that are not the server's never naming a file, and two stores (two API-server
processes) on one directory."""

from __future__ import annotations

from pathlib import Path

from batchlm.server.response_store import ResponseStore, StoredResponse


def rid(n: int) -> str:
    return f"resp_{n:032x}"


def turn(n: int, previous: int | None = None) -> StoredResponse:
    items = [
        {"role": "user", "content": f"q{n}"},
        {"type": "message", "role": "assistant", "content": f"a{n}"},
    ]
    return StoredResponse(None if previous is None else rid(previous), items, {"id": rid(n)})


def test_a_chain_reads_back_oldest_first(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=10)
    store.put(rid(1), turn(1))
    store.put(rid(2), turn(2, previous=1))
    store.put(rid(3), turn(3, previous=2))
    conversation = store.conversation(rid(3))
    assert conversation is not None
    assert [item["content"] for item in conversation] == ["q1", "a1", "q2", "a2", "q3", "a3"]
    assert store.get(rid(2)) == turn(2, previous=1)
    assert store.delete(rid(1)) and not store.delete(rid(1))
    assert store.conversation(rid(3)) is None, "a missing link loses the chain"


def test_the_oldest_beyond_the_capacity_are_removed(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, capacity=3)
    for n in range(10):
        store.put(rid(n), turn(n))
        assert len(list(tmp_path.glob("resp_*.json"))) == min(n + 1, 3)
    assert [store.get(rid(n)) is not None for n in range(10)] == [False] * 7 + [True] * 3
    assert not list(tmp_path.glob(".writing-*")), "no partial file is left behind"


def test_ids_that_are_not_the_servers_never_name_a_file(tmp_path: Path) -> None:
    inner = tmp_path / "store"
    store = ResponseStore(inner, capacity=10)
    (tmp_path / "secret.json").write_text('{"previous_id": null, "items": [], "response": {}}')
    for bad in ("../secret", "resp_../../secret", "secret", "resp_" + "0" * 31 + "/"):
        assert store.get(bad) is None and store.conversation(bad) is None and not store.delete(bad)
    assert (tmp_path / "secret.json").exists()


def test_two_stores_on_one_directory_read_each_other(tmp_path: Path) -> None:
    first, second = ResponseStore(tmp_path, capacity=10), ResponseStore(tmp_path, capacity=10)
    first.put(rid(1), turn(1))
    second.put(rid(2), turn(2, previous=1))
    conversation = first.conversation(rid(2))
    assert conversation is not None and [item["content"] for item in conversation][:2] == ["q1", "a1"]
