"""Pure-ASGI middleware (no per-request task, streaming-safe): API-key check, request-body size limit,
and the arrival stamp of each request."""

from __future__ import annotations

import hmac
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchlm.server.errors import APIError, ErrorObserver, error_response

# Routes that need the API key when one is set; /health, /metrics, /version and the docs stay open.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class APIKeyMiddleware:
    """401 in OpenAI's shape unless `Authorization: Bearer <key>` matches (the key compared in constant
    time; the scheme, like every HTTP auth scheme, case-insensitively)."""

    def __init__(self, app: ASGIApp, api_key: str, observe: ErrorObserver) -> None:
        self.app = app
        self._expected = api_key.encode()
        self._observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        if given is not None and hmac.compare_digest(_bearer_token(given), self._expected):
            await self.app(scope, receive, send)
            return
        if given is None:
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        else:
            message = "Incorrect API key provided."
        error = APIError(401, message, code="invalid_api_key")
        await error_response(error, self._observe)(scope, receive, send)


def _bearer_token(authorization: bytes) -> bytes:
    """The credentials of a Bearer Authorization header; b"" for any other scheme."""
    scheme, _, token = authorization.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES)


class BodySizeLimitMiddleware:
    """413 for bodies over `max_bytes`: announced by Content-Length, or counted while reading a chunked
    body. The body is read here in full (the handlers need all of it anyway) and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, observe: ErrorObserver) -> None:
        self.app = app
        self._max_bytes = max_bytes
        self._observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
            await self._reject(scope, receive, send)
            return
        try:
            body = await read_body(receive, self._max_bytes)
        except BodyTooLarge:
            await self._reject(scope, receive, send)
            return
        if body is None:
            return  # the client left before sending its body: nobody to answer
        await self.app(scope, replay_body(body, receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"The request body is larger than the limit of {self._max_bytes} bytes.")
        await error_response(error, self._observe)(scope, receive, send)


class BodyTooLarge(Exception):
    """The request body grew past the limit while it was read."""


async def read_body(receive: Receive, max_bytes: int | None = None) -> bytes | None:
    """The whole request body, or None when the client left first; BodyTooLarge past `max_bytes`."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body.extend(message.get("body", b""))
        if max_bytes is not None and len(body) > max_bytes:
            raise BodyTooLarge
        if not message.get("more_body", False):
            return bytes(body)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands out the buffered body once, then defers to the real one (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


RECEIVED_AT = "batchlm_received_at"


class ArrivalStampMiddleware:
    """Notes when each HTTP request reached the server (its headers parsed), so that the time spent
    before the engine admits it (body, validation, tokenization: the intake) can be measured."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[RECEIVED_AT] = time.time()
        await self.app(scope, receive, send)


def received_at(request: Request) -> float | None:
    """The request's arrival (time.time()) as ArrivalStampMiddleware noted it; None without it."""
    stamp = request.scope.get("state", {}).get(RECEIVED_AT)
    return float(stamp) if stamp is not None else None
