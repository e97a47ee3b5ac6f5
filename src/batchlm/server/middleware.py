"""Pure-ASGI middleware (no per-request task, streaming-safe): Host check, API-key check, request-body
intake (size limit, read timeout, Content-Encoding), and the arrival stamp of each request."""

from __future__ import annotations

import hmac
import logging
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchlm.server.allowed_hosts import AllowedHosts, host_name, origin_host
from batchlm.server.body_watch import BodyTimeout, BodyWatch
from batchlm.server.content_encoding import (
    DECODED,
    DecodedTooLarge,
    MalformedEncoding,
    UnsupportedEncoding,
    content_codings,
    decode_body,
)
from batchlm.server.errors import APIError, ErrorObserver, error_response
from batchlm.server.request_ids import REQUEST_ID, REQUEST_ID_HEADER, sent_request_id
from batchlm.server.root_path import route_path

logger = logging.getLogger(__name__)

# Routes that need the API key when one is set; /health, /metrics, /version and the docs stay open.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


# Refused hosts named in a warning, each once: a page retrying in a loop fills no log.
WARNED_HOSTS = 64
# The most of a refused Host header an answer or warning repeats.
SHOWN_HOST_CHARS = 100


class HostCheckMiddleware:
    """403 in OpenAI's shape for a request whose Host header names a host not `allowed` (the guard
    against DNS rebinding, allowed_hosts.py), or whose Origin header names a web page on such a host
    (a page on another site sending requests from its visitor's browser; not one the browser marks as
    the page's request to its own origin). Every route, OPTIONS included, and nothing of the request is
    read. A request without a Host header (HTTP/1.0) or with an empty one passes: a browser always
    names the host it requests."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts, observe: ErrorObserver) -> None:
        self.app = app
        self._allowed = allowed
        self._observe = observe
        self._warned: set[tuple[str, str]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        # A browser marks a page's request to the page's own origin (Sec-Fetch-Site, which no page can
        # set): the page is this server's, under the name the browser reached it by, which a reverse
        # proxy may have replaced in the Host header (nginx's default) but not in the Origin.
        own = any(name == b"sec-fetch-site" and value == b"same-origin" for name, value in headers)
        checked = (b"host",) if own else (b"host", b"origin")
        # Every Host and Origin header is checked: a second one must not carry a name past the first's
        # check.
        refused = next(
            (
                (name, value)
                for name, value in headers
                if name in checked and value and not self._allows(name, value)
            ),
            None,
        )
        if refused is None:
            await self.app(scope, receive, send)
            return
        # Header values are bytes as sent: latin-1 maps each to a character.
        name, shown = refused[0], refused[1].decode("latin-1")[:SHOWN_HOST_CHARS]
        self._warn(name.decode(), shown)
        if scope["type"] == "websocket":  # closed before it is accepted: the client sees a 403
            await send({"type": "websocket.close", "code": 1008})
            return
        error = host_not_allowed(shown) if name == b"host" else origin_not_allowed(shown)
        await error_response(error, self._observe)(scope, receive, send)

    def _allows(self, name: bytes, value: bytes) -> bool:
        # Clients other than browsers send no Origin.
        text = value.decode("latin-1")
        return self._allowed.allows(text) if name == b"host" else self._allowed.allows_origin(text)

    def _warn(self, header: str, value: str) -> None:
        if (header, value) in self._warned or len(self._warned) >= WARNED_HOSTS:
            return
        self._warned.add((header, value))
        logger.warning(
            "refused a request whose %s is %r: not a host this server answers to (--allowed-hosts); "
            "further such requests are refused without a warning",
            header.capitalize(),
            value,
        )


def host_not_allowed(host: str) -> APIError:
    """The refusal of a request for `host`. 403, not 400: the request itself is well-formed; this server
    refuses to be used under that name (as Ollama and Vite refuse hosts they do not know)."""
    name = host_name(host)
    flag = f"--allowed-hosts {name}" if name is not None else "--allowed-hosts with its name"
    return APIError(
        403,
        f"The Host header names '{host}', which this server does not answer to: it answers only names "
        "it is known by, so that a web page cannot take it over by re-pointing its own name at this "
        f"machine (DNS rebinding). Use a name it answers to (localhost, a loopback address, or one given "
        f"to --allowed-hosts), or start the server with {flag} (comma-separated names; '*' answers any "
        "host).",
        code="host_not_allowed",
        # The body, if any, is left unread: the connection cannot carry another request.
        headers={"Connection": "close"},
    )


def origin_not_allowed(origin: str) -> APIError:
    """The refusal of a request a web page at `origin` made (its Origin header)."""
    host = origin_host(origin)
    name = host_name(host) if host is not None else None
    flag = f"--allowed-hosts {name}" if name is not None else "--allowed-hosts '*'"
    return APIError(
        403,
        f"The request comes from a web page at '{origin}' (its Origin header), which this server does "
        "not answer: a page on another site could otherwise use it from your browser. Open the page "
        f"from a name this server answers to, or start the server with {flag} (comma-separated names; "
        "'*' answers any host and page).",
        code="origin_not_allowed",
        headers={"Connection": "close"},
    )


class APIKeyMiddleware:
    """401 in OpenAI's shape unless `Authorization: Bearer <key>` matches (the key compared in constant
    time; the scheme, like every HTTP auth scheme, case-insensitively)."""

    def __init__(self, app: ASGIApp, api_key: str, observe: ErrorObserver) -> None:
        self.app = app
        self._expected = api_key.encode()
        self._observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The route, as routing reads it: under --root-path the path begins with the prefix.
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _is_protected(route_path(scope)):
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
        elif not _is_bearer(given):
            # "Incorrect API key" would send the client looking for another key, not for the scheme.
            message = (
                "The Authorization header does not use Bearer auth: send your API key as "
                "Authorization: Bearer YOUR_KEY."
            )
        else:
            message = "Incorrect API key provided."
        # RFC 9110: a 401 names the scheme it takes.
        error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error_response(error, self._observe)(scope, receive, send)


def _bearer_token(authorization: bytes) -> bytes:
    """The credentials of a Bearer Authorization header; b"" for any other scheme."""
    return authorization.strip()[6:].strip() if _is_bearer(authorization) else b""


def _is_bearer(authorization: bytes) -> bool:
    scheme, _, _ = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer"


def _is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES)


class BodySizeLimitMiddleware:
    """Reads the request body in full (the handlers need all of it anyway) and replays it to the app:
    413 for bodies over `max_bytes` (announced by Content-Length, counted while reading a chunked
    body, or once decoded), 408 for a client that stops sending its body for `body_timeout_s`, and a
    gzip or deflate Content-Encoding decoded (415 for other codings)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, observe: ErrorObserver, body_timeout_s: float | None = None
    ) -> None:
        self.app = app
        self._max_bytes = max_bytes
        self._observe = observe
        self._watch = BodyWatch(body_timeout_s) if body_timeout_s is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
            await self._reject(scope, receive, send)
            return
        try:
            body = await read_body(receive, self._max_bytes, self._watch)
        except BodyTooLarge:
            await self._reject(scope, receive, send)
            return
        except BodyTimeout:
            assert self._watch is not None
            error = APIError(
                408,
                f"The request body did not arrive: nothing of it was received for {self._watch.timeout_s:g} s.",
            )
            await self._send_error(error, scope, receive, send)
            return
        if body is None:
            return  # the client left before sending its body: nobody to answer
        encoding = headers.get(b"content-encoding")
        if encoding is not None:
            try:
                body = decode_body(body, content_codings(encoding), self._max_bytes)
            except DecodedTooLarge:
                await self._reject(scope, receive, send, decoded=True)
                return
            except (UnsupportedEncoding, MalformedEncoding) as failure:
                await error_response(_encoding_error(failure), self._observe)(scope, receive, send)
                return
            scope = _with_decoded_body_headers(scope, len(body))
        await self.app(scope, replay_body(body, receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, decoded: bool = False) -> None:
        what = "decoded request body" if decoded else "request body"
        error = APIError(413, f"The {what} is larger than the limit of {self._max_bytes} bytes.")
        await self._send_error(error, scope, receive, send)

    async def _send_error(self, error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        """An error sent before the body was read in full: the rest of it would still have to be read
        before the next request on this connection, so the connection is closed instead."""
        error.headers.setdefault("Connection", "close")
        await error_response(error, self._observe)(scope, receive, send)


def _encoding_error(failure: Exception) -> APIError:
    if isinstance(failure, UnsupportedEncoding):
        supported = ", ".join(f"'{coding}'" for coding in DECODED)
        return APIError(
            415,
            f"Content-Encoding '{failure}' is not supported: send the body uncompressed or as one of {supported}.",
            code="unsupported_content_encoding",
        )
    return APIError(400, f"The request body could not be decoded as its Content-Encoding says ({failure}).")


def _with_decoded_body_headers(scope: Scope, length: int) -> Scope:
    """`scope` with the headers of its decoded body: no Content-Encoding, its own Content-Length."""
    headers = [
        (name, value)
        for name, value in scope["headers"]
        if name not in (b"content-encoding", b"content-length")
    ]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


class BodyTooLarge(Exception):
    """The request body grew past the limit while it was read."""


async def read_body(
    receive: Receive, max_bytes: int | None = None, watch: BodyWatch | None = None
) -> bytes | None:
    """The whole request body, or None when the client left first; BodyTooLarge past `max_bytes`,
    BodyTimeout when `watch` finds a read waiting past its time limit."""
    body = bytearray()
    while True:
        message = await (receive() if watch is None else watch.read(receive()))
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


class RequestIdEchoMiddleware:
    """Answers every request with an X-Request-Id: the one it carries (a proxy's or client's tracing
    id), else one made here, as OpenAI's API does and vLLM with --enable-request-id-headers: every
    response, errors included, can then be matched to its request and to its log lines (the OpenAI
    client reports it as the response's request id). The id is kept in the scope's state."""

    def __init__(self, app: ASGIApp, longest_echoed: int | None = None) -> None:
        """longest_echoed: a sent id longer than this many bytes is replaced by a new one (a 431's
        answer must not send back the oversized header it refuses)."""
        self.app = app
        self._longest_echoed = longest_echoed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = sent_request_id(scope["headers"], self._longest_echoed)
        scope.setdefault("state", {})[REQUEST_ID] = request_id
        header = request_id.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, header)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


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
