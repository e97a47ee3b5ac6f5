"""What the tests of the server's error answers share: a user message and a chat request of it, the
body limit their server is given, and how a test posts a raw request."""

from __future__ import annotations

from typing import Any

import httpx

from batchlm.server.background import BackgroundServer

USER = [{"role": "user", "content": "hi"}]
CHAT = {"messages": USER, "max_tokens": 2}
MAX_BODY = 4096


def post(server: BackgroundServer, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
