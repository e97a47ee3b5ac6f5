"""Requests the routes would refuse over a detail of HTTP, served as the route they name.

HEAD where only GET is routed: FastAPI's GET routes answer HEAD with 405, yet HTTP servers must
support HEAD wherever they support GET (monitors and balancers probe /health with it); it runs as GET
and the HTTP server sends the headers alone (it drops a HEAD response's body).

A trailing slash (/v1/chat/completions/): FastAPI would answer 307 with an absolute URL built from the
Host header, which behind a TLS-terminating proxy points at plain http, and which curl and most
clients do not follow for a POST; the route without the slash serves it instead.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send


class RouteAliases:
    """Pure ASGI, outside the routing it consults (the app's routes, read per request: pages may be
    added after this is built)."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if len(path) > 1 and path.endswith("/"):
                # Matched as the GET it may become, and as it is otherwise.
                sent = {**scope, "method": "GET"} if scope["method"] == "HEAD" else scope
                trimmed = {**sent, "path": path.rstrip("/") or "/"}
                # The route without the slash, unless only its path matches (405) while the path as
                # sent is routed (a mount's directory): "/v1/models/" lists the models, not model "".
                match = self._match(trimmed)
                if match == Match.FULL or (match == Match.PARTIAL and self._match(sent) == Match.NONE):
                    scope = {**scope, "path": trimmed["path"]}
            if scope["method"] == "HEAD" and self._match(scope) != Match.FULL:
                as_get = {**scope, "method": "GET"}
                if self._match(as_get) == Match.FULL:
                    scope = as_get
        await self.app(scope, receive, send)

    def _match(self, scope: Scope) -> Match:
        """How well the routes take `scope`: its path and method (FULL), its path alone (PARTIAL)."""
        return max(
            (route.matches(scope)[0] for route in self._routes), key=lambda m: m.value, default=Match.NONE
        )
