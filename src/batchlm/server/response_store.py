"""Stored responses of /v1/responses (`store`, true by default as in OpenAI's API), so that a request
may continue one by `previous_response_id` and GET /v1/responses/{id} may read it back. One SQLite
database in a directory that every API-server process of `--api-servers N` shares (a connection lands
on any of them), written before the response's last event is sent. Responses are kept by conversation
(a response and all that continue it): beyond the capacity, the conversations continued least recently
go whole, so that a long agent session is never cut at its oldest turn while it goes on. Nothing is
synced to disk: the store lives as long as the server. The routes look it up through stored_lookups.py
(off the event loop, with HTTP errors). Every item of
a stored response (its input items, each given an id, and its output items) is indexed by id beside it,
for `item_reference` input items and GET /v1/responses/{id}/input_items; removing a response removes
its items."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchlm.server.response_items import stored_input_items

# The ids this server gives responses; no other is looked up.
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
DATABASE_NAME = "responses.sqlite3"
TABLE = "stored_responses"
# Item id -> the item, for each item of each stored response.
ITEMS = "stored_items"
# The database's schema (SQLite's user_version). 0: responses alone; 1: their items indexed, and every
# input item stored with an id. A file of an older version is upgraded in place when opened.
SCHEMA_VERSION = 1
# Ids looked up in one query (SQLite bounds a statement's parameters).
LOOKUP_CHUNK = 500
# Seconds a process waits for another one's write to the database before failing.
LOCK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NewResponse:
    """A finished response to store."""

    id: str
    previous_id: str | None
    input_items: list[dict[str, Any]]
    response_json: str


@dataclass(frozen=True)
class StoredResponse:
    # The response it continued, if any.
    previous_id: str | None
    # This turn's input items (its instructions aside, which a continuation does not inherit).
    input_items: list[dict[str, Any]]
    # The response object as it was answered.
    response: dict[str, Any]

    @property
    def items(self) -> list[dict[str, Any]]:
        """What a continuation reads of this turn: its input, then its output items."""
        output: list[dict[str, Any]] = self.response.get("output") or []
        return [*self.input_items, *output]


def _item_rows(response_id: str, stored: StoredResponse) -> list[tuple[str, str, str]]:
    """(item id, response id, item JSON) of each of a response's items that has an id."""
    return [
        (item["id"], response_id, json.dumps(item, ensure_ascii=False))
        for item in stored.items
        if isinstance(item, dict) and isinstance(item.get("id"), str)
    ]


def _create_private(path: Path) -> None:
    """Creates the database file readable by its owner alone (SQLite gives its write-ahead log and
    shared-memory files the database's mode): a --responses-dir that others may read, or the umask's
    0644, must not show them the conversations. An existing file is left as it is."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


class ResponseStore:
    """Safe to use from several threads (one connection, one lock) and several processes (SQLite's
    own locking, in write-ahead-log mode)."""

    def __init__(self, directory: Path, capacity: int) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _create_private(directory / DATABASE_NAME)
        self.directory = directory
        self.capacity = capacity
        # The writes of the event loop this store serves (one store a loop: one an API server).
        self.writes = BatchedWrites(self)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            directory / DATABASE_NAME, timeout=LOCK_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")
            # seq orders the responses across processes; `conversation` is the id of the response the
            # chain began with, so a conversation is read and removed whole.
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "id TEXT UNIQUE NOT NULL, previous_id TEXT, conversation TEXT NOT NULL, body TEXT NOT NULL)"
            )
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_conversation ON {TABLE} (conversation)")
            self._upgrade()

    def _upgrade(self) -> None:
        """Brings a database of an older schema to this one, in place and once (the processes that
        open it together take turns: the first upgrades, the others find it done)."""
        with self._db:  # COMMIT, or ROLLBACK on any exception
            self._db.execute("BEGIN IMMEDIATE")
            # An item's id may recur (an output item sent back as input): its latest row answers.
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {ITEMS} (item_id TEXT NOT NULL, response_id TEXT NOT NULL, "
                "body TEXT NOT NULL)"
            )
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {ITEMS}_item ON {ITEMS} (item_id)")
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {ITEMS}_response ON {ITEMS} (response_id)")
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version < 1:
                # Responses stored before: their input items get ids, and all their items the index.
                for response_id, previous_id, body in self._db.execute(
                    f"SELECT id, previous_id, body FROM {TABLE}"
                ).fetchall():
                    old = _stored(previous_id, body)
                    stored = StoredResponse(previous_id, stored_input_items(old.input_items), old.response)
                    new_body = json.dumps(
                        {"input_items": stored.input_items, "response": stored.response}, ensure_ascii=False
                    )
                    self._db.execute(f"UPDATE {TABLE} SET body = ? WHERE id = ?", (new_body, response_id))
                    self._db.executemany(
                        f"INSERT INTO {ITEMS} VALUES (?, ?, ?)", _item_rows(response_id, stored)
                    )
            if version < SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def put(self, responses: Sequence[NewResponse]) -> None:
        """Store responses, in one transaction (a burst of finishing requests writes once); then remove
        the conversations continued least recently while more than the capacity is kept (never the
        one continued last, however long)."""
        rows = []
        item_rows: list[tuple[str, str, str]] = []
        for new in responses:
            assert RESPONSE_ID.fullmatch(new.id), new.id
            inputs = stored_input_items(new.input_items)
            # The response as answered, its JSON text not written again.
            items = json.dumps(inputs, ensure_ascii=False)
            rows.append(
                (new.id, new.previous_id, f'{{"input_items":{items},"response":{new.response_json}}}')
            )
            stored = StoredResponse(new.previous_id, inputs, json.loads(new.response_json))
            item_rows += _item_rows(new.id, stored)
        with self._lock, self._db:  # COMMIT, or ROLLBACK on any exception
            self._db.execute("BEGIN")
            for response_id, previous_id, body in rows:
                # A chain whose start is gone (deleted) begins anew here.
                self._db.execute(
                    f"INSERT INTO {TABLE} (id, previous_id, conversation, body) VALUES (?1, ?2, "
                    f"coalesce((SELECT conversation FROM {TABLE} WHERE id = ?2), ?1), ?3)",
                    (response_id, previous_id, body),
                )
            self._db.executemany(f"INSERT INTO {ITEMS} VALUES (?, ?, ?)", item_rows)
            gone = self._db.execute(
                f"SELECT conversation FROM ("
                f"SELECT conversation, max(seq) AS last, sum(count(*)) OVER (ORDER BY max(seq) DESC) AS kept "
                f"FROM {TABLE} GROUP BY conversation) WHERE kept > ? AND last < (SELECT max(seq) FROM {TABLE})",
                (self.capacity,),
            ).fetchall()
            for conversation in gone:  # with their items
                self._db.execute(
                    f"DELETE FROM {ITEMS} WHERE response_id IN "
                    f"(SELECT id FROM {TABLE} WHERE conversation = ?)",
                    conversation,
                )
                self._db.execute(f"DELETE FROM {TABLE} WHERE conversation = ?", conversation)

    def get(self, response_id: str) -> StoredResponse | None:
        if not RESPONSE_ID.fullmatch(response_id):
            return None
        with self._lock:
            row = self._db.execute(
                f"SELECT previous_id, body FROM {TABLE} WHERE id = ?", (response_id,)
            ).fetchone()
        return None if row is None else _stored(row[0], row[1])

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """The items of the response and of those it continued, oldest first; None when any of them is
        not stored (never was, or deleted)."""
        chain, missing = self._chain(response_id)
        if missing is not None:
            return None
        return [item for stored in reversed(chain) for item in stored.items]

    def missing_link(self, response_id: str) -> str | None:
        """Which response of this one's chain is not stored (itself, or one it continued); None when
        the whole chain is."""
        return self._chain(response_id)[1]

    def _chain(self, response_id: str) -> tuple[list[StoredResponse], str | None]:
        """The response and those it continued, newest first, up to the first that is not stored
        (returned too; None when every one is)."""
        if not RESPONSE_ID.fullmatch(response_id):
            return [], response_id
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, previous_id, body FROM {TABLE} WHERE conversation = "
                f"(SELECT conversation FROM {TABLE} WHERE id = ?)",
                (response_id,),
            ).fetchall()
        # The conversation's responses, of every branch: follow this one's links back.
        links = {row[0]: (row[1], row[2]) for row in rows}
        chain: list[StoredResponse] = []
        current: str | None = response_id
        while current is not None:
            if current not in links:
                return chain, current
            previous_id, body = links.pop(current)  # popped: a chain visits each response once
            chain.append(_stored(previous_id, body))
            current = previous_id
        return chain, None

    def items(self, item_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored items of these ids (those found): the latest stored, where an id recurs."""
        wanted = list(dict.fromkeys(item_ids))
        found: dict[str, str] = {}
        with self._lock:
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[start : start + LOOKUP_CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT item_id, body FROM {ITEMS} WHERE item_id IN ({marks}) ORDER BY rowid", chunk
                ).fetchall()
                found.update((item_id, body) for item_id, body in rows)
        return {item_id: json.loads(body) for item_id, body in found.items()}

    def delete(self, response_id: str) -> bool:
        """Delete a response and its items."""
        if not RESPONSE_ID.fullmatch(response_id):
            return False
        with self._lock, self._db:  # COMMIT, or ROLLBACK on any exception
            self._db.execute("BEGIN")
            self._db.execute(f"DELETE FROM {ITEMS} WHERE response_id = ?", (response_id,))
            return self._db.execute(f"DELETE FROM {TABLE} WHERE id = ?", (response_id,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _stored(previous_id: str | None, body: str) -> StoredResponse:
    data = json.loads(body)
    return StoredResponse(previous_id, data["input_items"], data["response"])


class BatchedWrites:
    """Stores the responses of one event loop, each awaited until it is written: those that finish
    while a write is under way go together in the next one, in a thread."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self._pending: list[tuple[NewResponse, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def put(self, response: NewResponse) -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((response, written))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_all())
        await asyncio.shield(written)

    async def _write_all(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await asyncio.to_thread(self.store.put, [response for response, _ in batch])
                except Exception as error:  # each waiting response answers with it
                    for _, written in batch:
                        written.set_exception(error)
                else:
                    for _, written in batch:
                        written.set_result(None)
        finally:
            self._writer = None
