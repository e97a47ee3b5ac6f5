"""What the tests of POST /v1/responses share: the replies a fake engine gives (text, and thinking
before an answer), the chat tools as the Responses API declares them, and how a test posts a raw
request or reads a raw stream's events."""

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
