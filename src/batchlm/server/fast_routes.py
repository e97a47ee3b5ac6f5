"""The generation endpoints dispatched straight from ASGI to their handlers.

A burst of requests is bounded by the event loop's own work per request. Through FastAPI that is
routing over every route, dependency solving, a JSON parse, model validation and four more ASGI
layers on the way in, plus a wrapper around every SSE chunk on the way out (docs/architecture.md,
"Front-end budget under a burst"). For POST /v1/completions, /v1/chat/completions and /v1/responses
with a JSON body this middleware validates the body in one pydantic call and calls the same handler
the route would. Anything it does not take cleanly, including every malformed or invalid body,
continues to FastAPI with the body replayed, so error responses stay exactly FastAPI's (and the
OpenAPI schema still lists the routes).

Except for nesting: FastAPI's reader (Python's json) takes a body nested far past the 200 levels
pydantic's does, so a body nested past json_text.MAX_DEPTH is refused here, for every JSON route, with
one 400 (the same bodies a batch file's line may carry, whichever reader would have read them).
"""

from __future__ import annotations

import email.message
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from batchlm import json_text
from batchlm.server.errors import APIError, ErrorObserver, error_response
from batchlm.server.middleware import read_body, replay_body
from batchlm.server.protocol import ChatCompletionRequest, CompletionRequest
from batchlm.server.protocol_responses import ResponsesRequest
from batchlm.server.root_path import route_path
from batchlm.server.serving_chat import create_chat_completion
from batchlm.server.serving_completions import create_completion
from batchlm.server.serving_responses import create_response

Handler = Callable[[Request, Any], Awaitable[Response]]
ROUTES: dict[str, tuple[type[BaseModel], Handler]] = {
    "/v1/completions": (CompletionRequest, create_completion),
    "/v1/chat/completions": (ChatCompletionRequest, create_chat_completion),
    "/v1/responses": (ResponsesRequest, create_response),
}
# The other routes with a JSON body: FastAPI reads it, once its nesting is checked here.
DEPTH_CHECKED = frozenset({"/tokenize", "/detokenize"})
TOO_DEEP = (
    "The request body could not be parsed as JSON: "
    f"its arrays or objects nest more than {json_text.MAX_DEPTH} levels deep."
)


class FastGenerationRoutes:
    """Pure ASGI. Must sit inside the body-size and API-key middleware (it trusts both checks done)."""

    def __init__(self, app: ASGIApp, observe: ErrorObserver) -> None:
        self.app = app
        self._observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_post = scope["type"] == "http" and scope["method"] == "POST"
        path = route_path(scope) if is_post else ""
        route = ROUTES.get(path)
        if (route is None and path not in DEPTH_CHECKED) or not _json_content(scope):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client left before its body arrived
        parsed = _validated(route[0], body) if route is not None else None
        if route is None or parsed is None:  # FastAPI reads the body, or writes the error response
            if json_text.body_too_deep(body):
                await error_response(APIError(400, TOO_DEEP), self._observe)(scope, receive, send)
                return
            await self.app(scope, replay_body(body, receive), send)
            return
        request = Request(scope, replay_body(body, receive))
        try:
            response = await route[1](request, parsed)
        except APIError as error:
            response = error_response(error, self._observe)
        await response(scope, receive, send)


def _validated(model: type[BaseModel], body: bytes) -> BaseModel | None:
    """The body as `model`, or None where it is empty, malformed or invalid."""
    try:
        return model.model_validate_json(body) if body else None
    except ValidationError:
        return None


def _json_content(scope: Scope) -> bool:
    """True when FastAPI would parse the body as JSON: no content type, or application/json or +json."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            message = email.message.Message()
            message["content-type"] = value.decode("latin-1")
            subtype = message.get_content_subtype()
            return message.get_content_maintype() == "application" and (
                subtype == "json" or subtype.endswith("+json")
            )
    return True
