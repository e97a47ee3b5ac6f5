"""uvicorn's HTTP protocol with a deadline for each request's headers, as nginx's client_header_timeout.

uvicorn closes a connection left idle after a response (its keep-alive timeout), but a connection that
never sends a request, or sends part of its headers and stalls, any byte of which cancels that timer,
is held open for ever: one client opening such connections by the thousand (slowloris) holds a file
descriptor and a parser each until the server runs out. Here a connection gets `timeout_s` from its
start, and again from the end of each response, to send a request's headers in full; a request being
served is never cut. The body's own deadline is BodySizeLimitMiddleware's.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: uvicorn's own choice stands
    HttpToolsProtocol = None  # type: ignore[assignment, misc]


def header_deadline_protocol(timeout_s: float) -> type[Any] | None:
    """An HTTP protocol class for uvicorn.Config(http=...) that closes a connection whose request headers
    take longer than `timeout_s`; None where httptools is not installed."""
    if HttpToolsProtocol is None:
        return None

    class HeaderDeadlineProtocol(HttpToolsProtocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # uvicorn arms its keep-alive timer only when the connection waits for a next request
            # (none pipelined, not closing): that request's headers get the deadline too.
            if self.timeout_keep_alive_task is not None:
                self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_overdue)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_overdue(self) -> None:
            self._header_timer = None
            serving = self.cycle is not None and not self.cycle.response_complete
            if not serving and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
