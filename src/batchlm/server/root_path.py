"""Serving under a path prefix (`--root-path /llm`), for a reverse proxy that serves the server at
https://host/llm/, as uvicorn's and vLLM's --root-path do.

Whether the proxy strips the prefix before passing a request on (nginx's `proxy_pass
http://server/;`, Traefik's StripPrefix) or not (`proxy_pass http://server;`), each request reaches
the app as ASGI has it: `root_path` the prefix, `path` the prefix and the route. Routing and the
middleware read the route (route_path, as starlette's router does), the pages name their files and the API under
the prefix (pages.public_prefix), and the OpenAPI document names it as its server."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

# "/" and segments of plain URL characters; nothing that could leave an HTML attribute, nor "//" (which
# a browser reads as another host).
PREFIX = re.compile(r"(?:/[A-Za-z0-9._~%+-]+)+/?")


def checked_root_path(root_path: str) -> str:
    """The prefix without its trailing slash ("" for none); ValueError for one that is not a path."""
    if root_path in ("", "/"):
        return ""
    if not PREFIX.fullmatch(root_path):
        raise ValueError(
            f"--root-path {root_path!r} is not a URL path prefix: give it as the proxy serves the "
            "server, e.g. /llm"
        )
    return root_path.rstrip("/")


class RootPath:
    """Pure ASGI, outermost: every request's scope with the prefix as its root_path, and in its path
    whether or not the proxy left it there."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self._root = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            root = self._root
            if path == root:  # the prefix alone, passed on unstripped, is the root (the chat page)
                path = f"{root}/"
            elif not path.startswith(f"{root}/"):  # the proxy stripped it
                path = f"{root}{path}"
            scope = {**scope, "path": path, "root_path": root}
        await self.app(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The request's route: its path less the root_path prefix, as starlette's router matches it (the
    key check and the fast routes read the same, so that no prefix gets a request past either)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    rest = path[len(root) :]
    if not rest:
        return ""
    return rest if rest.startswith("/") else path
