"""A request's X-Request-Id, as the middleware keeps it in the ASGI scope for the handlers and logs."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from starlette.requests import Request

REQUEST_ID_HEADER = b"x-request-id"
# The scope's state key of the id (RequestIdEchoMiddleware).
REQUEST_ID = "batchlm_request_id"


def new_request_id() -> str:
    """An id for a request that came without one, in the form OpenAI's are."""
    return f"req_{uuid.uuid4().hex}"


def sent_request_id(headers: Iterable[tuple[bytes, bytes]], longest: int | None = None) -> str:
    """The first X-Request-Id among `headers`, else (also for one longer than `longest` bytes) a new one."""
    sent = next((value for name, value in headers if name == REQUEST_ID_HEADER and value), b"")
    if sent and (longest is None or len(sent) <= longest):
        return sent.decode("latin-1")  # header values are bytes as sent: latin-1 maps each to a character
    return new_request_id()


def request_id_of(request: Request) -> str | None:
    """The request's X-Request-Id (sent, or made by RequestIdEchoMiddleware); None without it."""
    request_id = request.scope.get("state", {}).get(REQUEST_ID)
    return str(request_id) if request_id is not None else None
