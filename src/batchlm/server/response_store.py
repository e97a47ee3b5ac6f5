"""Stored responses of /v1/responses (`store`, true by default as in OpenAI's API), so that a request
may continue one by `previous_response_id` and GET /v1/responses/{id} may read it back. One JSON file a
response in a directory that every API-server process of `--api-servers N` shares (a connection lands
on any of them), written whole before the response's last event is sent; the oldest beyond the
capacity are removed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The ids this server gives responses; anything else never names a file.
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
# Writes between two sweeps for the oldest files beyond the capacity (a sweep lists the directory),
# at most: an eighth of the capacity for a small one.
SWEEP_EVERY = 128


@dataclass(frozen=True)
class StoredResponse:
    # The response it continued, if any.
    previous_id: str | None
    # This turn's input items (its instructions aside, which a continuation does not inherit), then
    # its output items: what a continuation reads as the conversation so far.
    items: list[dict[str, Any]]
    # The response object as it was answered.
    response: dict[str, Any]


class ResponseStore:
    def __init__(self, directory: Path, capacity: int) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.capacity = capacity
        self._writes = 0
        # The last modification time given, so that files order by it even within one clock tick.
        self._last_mtime_ns = 0

    def put(self, response_id: str, stored: StoredResponse) -> None:
        path = self._path(response_id)
        assert path is not None, response_id
        text = json.dumps(
            {"previous_id": stored.previous_id, "items": stored.items, "response": stored.response},
            ensure_ascii=False,
        )
        # Whole or not at all: another process may read it the moment it exists. The id is new, so
        # its temporary name is no other writer's.
        temporary = self.directory / f".writing-{response_id}"
        with open(temporary, "x", encoding="utf-8") as file:
            file.write(text)
        self._last_mtime_ns = max(time.time_ns(), self._last_mtime_ns + 1)
        os.utime(temporary, ns=(self._last_mtime_ns, self._last_mtime_ns))
        os.replace(temporary, path)
        self._writes += 1
        if self._writes == 1 or self._writes % max(1, min(SWEEP_EVERY, self.capacity // 8)) == 0:
            self._sweep()

    def get(self, response_id: str) -> StoredResponse | None:
        path = self._path(response_id)
        if path is None:
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return StoredResponse(data["previous_id"], data["items"], data["response"])

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """The items of the response and of those it continued, oldest first; None when any of them is
        not stored (never was, deleted, or removed as the oldest)."""
        chain: list[StoredResponse] = []
        current: str | None = response_id
        while current is not None and len(chain) <= self.capacity:
            stored = self.get(current)
            if stored is None:
                return None
            chain.append(stored)
            current = stored.previous_id
        return [item for stored in reversed(chain) for item in stored.items]

    def delete(self, response_id: str) -> bool:
        path = self._path(response_id)
        if path is None:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def _path(self, response_id: str) -> Path | None:
        return self.directory / f"{response_id}.json" if RESPONSE_ID.fullmatch(response_id) else None

    def _sweep(self) -> None:
        """Remove the oldest stored responses beyond the capacity."""
        try:
            found = [entry for entry in os.scandir(self.directory) if entry.name[:5] == "resp_"]
            if len(found) <= self.capacity:
                return
            entries = [(entry.stat().st_mtime_ns, entry.path) for entry in found]
        except OSError:  # a file removed while listing: the next sweep sees the rest
            logger.debug("sweeping the stored responses failed", exc_info=True)
            return
        entries.sort()
        for _, path in entries[: max(0, len(entries) - self.capacity)]:
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                os.unlink(path)
