"""The OpenAI error body every failed request must get, checked in one place."""

from __future__ import annotations

from typing import Any

import httpx


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of `response`, after checking its status and OpenAI's shape (the four keys,
    and no traceback in the message)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    return error
