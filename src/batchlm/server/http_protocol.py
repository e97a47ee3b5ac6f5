"""The HTTP/1.1 connections under the app: uvicorn's httptools protocol with what a server open to any
client needs and uvicorn leaves out.

- A deadline for each request's headers, as nginx's client_header_timeout: uvicorn closes a connection
  left idle after a response (its keep-alive timeout), but one that never sends a request, or sends
  part of its headers and stalls (any byte of which cancels that timer), is held open for ever; one
  client opening such connections by the thousand (slowloris) holds a file descriptor and a parser each.
  Here a connection gets the timeout from its start, and from the first byte of each request, to send
  the request's headers in full, or it is closed; a request being served is never cut.
- A limit on the request line and headers (431 beyond): uvicorn keeps any amount in memory.
- A cap on open connections (503 beyond, and a warning in the log).
- A response of unknown length to an HTTP/1.0 client is ended by closing the connection: uvicorn sends
  it chunked, which HTTP/1.0 does not know.
- An answer sent before its request's body has all arrived (413 for a body past the limit) is read by
  the client: the rest of the body is read and dropped before the connection closes (uvicorn closes
  at once, which resets the connection under a client still sending, and loses the answer).
- A request the parser refuses gets its 400 (414 for a target past the URL parser's 65535 bytes) as
  OpenAI-shaped JSON naming what is wrong, and a warning at most once a minute in place of uvicorn's
  line for each (a client sending garbage fills no log).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from batchlm.server.errors import RETRY_AFTER_S, APIError, ErrorObserver, error_response, was_logged
from batchlm.server.middleware import RequestIdEchoMiddleware
from batchlm.server.request_ids import REQUEST_ID, new_request_id, sent_request_id
from batchlm.server.shared_deadline import SharedDeadline

logger = logging.getLogger(__name__)

# As nginx's client_header_timeout and Node's headersTimeout.
DEFAULT_HEADER_TIMEOUT_S = 60.0
# Four times nginx's default buffers: no client sends more, and a connection's headers stay cheap to hold.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
# The longest X-Request-Id the refusals here echo: a tracing id is tens of bytes, while a longer one may
# be the very header a 431 refuses, which a client's parser (h11's 16 KiB, aiohttp's 8 KiB a line) would
# then refuse in the answer too, never reading the 431. A longer one is answered with a new id.
LONGEST_ECHOED_ID = 512
# uvicorn's own default.
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 5.0
# Seconds between two warnings that connections are refused for want of file descriptors.
CAP_WARNING_INTERVAL_S = 60.0
# Seconds between two warnings that the HTTP parser refused requests.
PARSER_WARNING_INTERVAL_S = 60.0
# What uvicorn logs, unthrottled, for each request its parser refuses (ParserRefusals logs instead).
UVICORN_PARSER_WARNING = "Invalid HTTP request received."
# What uvicorn logs, with the traceback, for an error the app raised.
UVICORN_APP_ERROR = "Exception in ASGI application\n"


class ThrottledWarning:
    """Events counted and logged as one warning at most every `interval_s`: `message`'s first argument
    is how many there were since the last warning, the rest are the latest event's."""

    def __init__(self, message: str, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.message = message
        self.interval_s = interval_s
        self._clock = clock
        self._count = 0
        self._warned_at: float | None = None

    def count(self, *args: object) -> None:
        self._count += 1
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= self.interval_s:
            logger.warning(self.message, self._count, *args)
            self._warned_at = now
            self._count = 0


class ParserRefusals(ThrottledWarning):
    """The requests the HTTP parser refused (each answered 400, or 414 for a target too long), logged as
    one warning at most every `interval_s`, with how many there were since the last and the latest's
    reason."""

    def __init__(
        self,
        interval_s: float = PARSER_WARNING_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            "%d request(s) refused with 400: not valid HTTP (the latest, from %s: %s)", interval_s, clock
        )

    def refused(self, reason: str, client: str) -> None:
        self.count(client, reason)


class _WithoutParserWarning(logging.LoggerAdapter[logging.Logger]):
    """uvicorn's logger for a connection, less its warning for each request the parser refuses (which
    ParserRefusals logs, throttled) and its traceback of an error the app logged already, with the
    request's id (errors.mark_logged); every other record passes."""

    @property
    def level(self) -> int:  # uvicorn reads it to skip its trace records
        return self.logger.level

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level == logging.WARNING and msg == UVICORN_PARSER_WARNING:
            return
        if level == logging.ERROR and msg == UVICORN_APP_ERROR and was_logged(kwargs.get("exc_info")):
            return
        super().log(level, msg, *args, **kwargs)


class ServerConfig(uvicorn.Config):
    """uvicorn's Config with the limits GuardedHttpProtocol enforces, and what its connections share."""

    def __init__(
        self,
        app: Any,
        *,
        observe: ErrorObserver,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        max_connections: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(app, http=GuardedHttpProtocol, **options)
        self.observe = observe
        self.max_header_bytes = max_header_bytes
        self.header_watch: SharedDeadline[GuardedHttpProtocol] = SharedDeadline(
            header_timeout_s, GuardedHttpProtocol.header_timed_out
        )
        # Past it, a new connection is answered 503 and closed: without it, a server out of file
        # descriptors drops new connections unanswered (uvloop accepts and resets them, logging
        # nothing), and a file it opens mid-request fails.
        self.max_connections = max_connections
        self.connection_refusals = ThrottledWarning(
            "%d connection(s) refused with 503: %d are open, the most this server holds "
            "(--max-connections; by default its open-file limit less a reserve)",
            CAP_WARNING_INTERVAL_S,
        )
        self.parser_refusals = ParserRefusals()


class GuardedHttpProtocol(HttpToolsProtocol):
    """One client connection (see the module's description)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, ServerConfig)
        self._config = config
        self._watch = config.header_watch
        self.logger = _WithoutParserWarning(self.logger, {})  # type: ignore[assignment]
        # Between the first byte of a request and the end of its headers.
        self._reading_headers = False
        # Whether the request being read began in the data being parsed now.
        self._began_in_chunk = False
        # Bytes of the unfinished header block received in earlier chunks (the chunk a request begins
        # in is not counted: where in it the request began is unknown).
        self._header_bytes = 0
        # Set once an error has been sent outside a request: what the client still sends is dropped.
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self._config.max_connections
        if cap is not None and len(self.connections) > cap:
            self._config.connection_refusals.count(cap)
            message = "The server holds as many connections as it can; retry shortly."
            headers = {"Retry-After": RETRY_AFTER_S}
            # Closed at once: its file descriptor is what is short.
            self._refuse(APIError(503, message, code="too_many_connections", headers=headers), linger=False)
            return
        self._watch.watch(self)  # a connection that never sends a request is closed in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._watch.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._began_in_chunk = False
        super().data_received(data)
        if self._lingering or self.transport.is_closing():
            return
        if self._reading_headers:
            self._header_bytes = 0 if self._began_in_chunk else self._header_bytes + len(data)
            if self._header_bytes > self._config.max_header_bytes:
                self._refuse(self._too_large())
                return
            self._watch.watch(self)
        elif self.timeout_keep_alive_task is None and self._idle():
            # Data that began no request (blank lines) stopped the keep-alive timer: this closes it instead.
            self._watch.watch(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._began_in_chunk = True
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._watch.forget(self)
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self._config.max_header_bytes:
            # Answered in turn as any request (after those pipelined before it), by an app that refuses it.
            refusal = RequestIdEchoMiddleware(
                error_response(self._too_large(), self._config.observe), longest_echoed=LONGEST_ECHOED_ID
            )
            app, self.app = self.app, refusal
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            _linger_after_early_answer(self, cycle)
            if self.scope["http_version"] == "1.0":
                _delimit_by_close(cycle)

    def send_400_response(self, msg: str) -> None:
        # Called by uvicorn while it handles the parser's error: that error says what is wrong, or for
        # "User callback error" the error of the callback it wraps (uvicorn's, which reads the target
        # with httptools' URL parser: past 65535 bytes, whatever max_header_bytes allows, it refuses).
        failure = sys.exc_info()[1]
        if isinstance(failure, httptools.HttpParserCallbackError) and failure.__context__ is not None:
            failure = failure.__context__
        detail = str(failure) if failure is not None and str(failure) else msg
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "an unknown client"
        self._config.parser_refusals.refused(detail.rstrip("."), client)
        too_long = isinstance(failure, httptools.HttpParserInvalidURLError) and "too long" in detail
        self._refuse(APIError(414 if too_long else 400, f"Invalid HTTP request: {detail.rstrip('.')}."))

    def header_timed_out(self) -> None:
        """The header deadline passed: the connection is closed, unless a response is still being sent
        (the late headers are a request pipelined behind it, which then gets the deadline again)."""
        if self.transport.is_closing():
            return
        if not self._lingering and not self._idle():
            self._watch.watch(self)
            return
        self.transport.close()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _too_large(self) -> APIError:
        return APIError(
            431,
            f"The request line and headers are larger than the limit of {self._config.max_header_bytes} bytes.",
            headers={"Connection": "close"},
        )

    def _refuse(self, error: APIError, linger: bool = True) -> None:
        """Answer `error` outside any request's cycle, then close: the rest of what the client sent
        cannot be read as requests."""
        self._config.observe(error.status)
        if self._idle() or not self.cycle.response_started:
            body = json.dumps(error.body(), separators=(",", ":")).encode()
            phrase = http.HTTPStatus(error.status).phrase.encode()
            head = [b"HTTP/1.1 %d %s\r\n" % (error.status, phrase)]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [
                f"{name.lower()}: {value}\r\n".encode("latin-1")
                for name, value in error.headers.items()
                if name.lower() != "connection"
            ]
            # As every response the app sends has one: the request's, where the app has taken it.
            head.append(b"x-request-id: %s\r\n" % self._request_id().encode("latin-1"))
            head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
            head.append(b"connection: close\r\n\r\n")
            self.transport.write(b"".join(head) + body)
        if not self._idle():
            # The request in progress can send nothing more (uvicorn would write it after the error).
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if not linger:
            self.transport.close()
            return
        self.linger()

    def _request_id(self) -> str:
        """The X-Request-Id of the request in progress (RequestIdEchoMiddleware's), else the one sent
        among the headers read so far of the request refused (as the 431 of a whole header block
        echoes it), else a new one."""
        if not self._idle():
            taken = self.cycle.scope.get("state", {}).get(REQUEST_ID)
            return taken if isinstance(taken, str) else new_request_id()
        return sent_request_id(self.headers if self._reading_headers else (), LONGEST_ECHOED_ID)

    def linger(self) -> None:
        """Close the connection once the client has sent the rest of its request. Closed at once, it
        would be reset under a client still sending (its request too large), which then never reads
        the answer already written: the rest is read and dropped until the client closes, or until
        the header deadline."""
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        self.transport.write_eof()
        self._lingering = True
        self.flow.resume_reading()
        self._watch.forget(self)
        self._watch.watch(self)


def _linger_after_early_answer(protocol: GuardedHttpProtocol, cycle: RequestResponseCycle) -> None:
    """Makes a response that closes the connection before its request's body has all arrived (413 for
    a body past the limit, 408) linger instead (GuardedHttpProtocol.linger): uvicorn closes at once,
    which resets the connection under the client still sending its body, so that it never reads the
    answer (an SDK reports a connection error, and retries the same body)."""
    send: Callable[[Any], Awaitable[None]] = cycle.send

    def send_then_linger(message: Any) -> Awaitable[None]:
        # Every message of every response passes here: the common ones (a stream's chunks, answers on
        # a kept-alive connection, a body all in) go straight to uvicorn's send, with no frame added.
        if (
            message.get("more_body", False)
            or cycle.keep_alive
            or not cycle.more_body  # the request's body has all arrived
            or cycle.response_complete
            or message["type"] != "http.response.body"
        ):
            return send(message)
        return send_early(message)

    async def send_early(message: Any) -> None:
        cycle.keep_alive = True  # uvicorn closes a connection that is not kept alive as it ends
        try:
            await send(message)
        finally:
            cycle.keep_alive = False
        if not protocol.transport.is_closing():
            protocol.linger()

    cycle.send = send_then_linger  # type: ignore[method-assign,assignment]


def _delimit_by_close(cycle: RequestResponseCycle) -> None:
    """Sends `cycle`'s response to its HTTP/1.0 client ended by closing the connection when it has no
    Content-Length (uvicorn would chunk it; HTTP/1.0 has no chunked coding), by changing its send()."""
    send: Callable[[Any], Awaitable[None]] = cycle.send
    unframed = False

    async def send_delimited_by_close(message: Any) -> None:
        nonlocal unframed
        if message["type"] == "http.response.start" and not cycle.response_started:
            names = {name.lower() for name, _ in message.get("headers", ())}
            unframed = (
                b"content-length" not in names
                and b"transfer-encoding" not in names
                and cycle.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
            )
            if unframed:
                cycle.chunked_encoding = False  # uvicorn chooses chunks only while this is None
        elif unframed and message["type"] == "http.response.body":
            # uvicorn checks each piece against the Content-Length still due: here, the piece itself.
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    cycle.send = send_delimited_by_close  # type: ignore[method-assign]
