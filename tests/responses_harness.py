"""What the tests of POST /v1/responses share: the replies a fake engine gives (text, and thinking
before an answer), the chat tools as the Responses API declares them, and how a test posts a raw
request, reads a raw stream's events and checks their order."""

from __future__ import annotations

import json
from typing import Any

import httpx

from batchlm.server.background import BackgroundServer
from tools_harness import TOOLS

REPLY = "Hello from the fake engine."
THOUGHT = "The user wants Paris.\nSo: Paris."
THINKING_REPLY = f"<think>\n{THOUGHT}\n</think>\n\nIt is Paris."
# The chat tools, as the Responses API declares them (flat).
FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]


def post(server: BackgroundServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/responses", json={"input": "hi", **body}, timeout=30)


def events_of(server: BackgroundServer, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, payload) of a raw stream, with every line checked to be SSE."""
    events = []
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        text = response.read().decode()
    for block in text.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        payload = json.loads(data_line.removeprefix("data: "))
        # Every event is its payload's compact JSON, key order included (delta events are framed).
        assert data_line == "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        events.append((name_line.removeprefix("event: "), payload))
    assert text.endswith("\n\n") and "[DONE]" not in text
    return events


def check_order(events: list[dict[str, Any]]) -> None:
    """Items added in output order, each finished before the next starts; deltas only inside one."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    open_item: dict[str, Any] | None = None
    next_index = 0
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert open_item is None and event["output_index"] == next_index
            open_item = event["item"]
        elif kind == "response.output_item.done":
            assert open_item is not None and event["item"]["id"] == open_item["id"]
            open_item, next_index = None, next_index + 1
        else:
            assert open_item is not None and event["item_id"] == open_item["id"], kind
