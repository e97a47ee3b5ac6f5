"""OpenAI-shaped API errors: one exception type, its JSON body, and the FastAPI handlers that render it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchlm.engine.client import EngineDeadError, QueueFullError, RequestRejectedError
from batchlm.server.request_ids import request_id_of
from batchlm.tools.spec import ToolUseError
from batchlm.unicode_text import encodable
from batchlm.validation_errors import UNKNOWN, most_specific, param_from_loc

logger = logging.getLogger(__name__)

# OpenAI's error `type` where it is neither "server_error" (5xx) nor "invalid_request_error" (4xx).
ERROR_TYPES: dict[int, str] = {429: "rate_limit_exceeded", 503: "service_unavailable"}
# Seconds a client refused with 429 should wait before retrying: the queue moves within a few steps.
RETRY_AFTER_S = "1"


class APIError(Exception):
    """An error the client should see: HTTP status plus OpenAI's {message, type, param, code}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        # Extra response headers (Retry-After on a 429, Allow on a 405).
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON OpenAI sends for an error (also the payload of a streaming error event)."""
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = None if param is None else encodable(param)
    return {"error": {"message": encodable(message), "type": error_type, "param": param, "code": code}}


def engine_error_to_api_error(error: Exception) -> APIError | None:
    """The HTTP meaning of the engine's documented errors and tool use's refusals; None for anything
    else (a bug: 500)."""
    if isinstance(error, RequestRejectedError | ToolUseError):
        return _rejection(error)
    if isinstance(error, QueueFullError):
        return APIError(
            429, _overloaded_message(str(error)), code="queue_full", headers={"Retry-After": RETRY_AFTER_S}
        )
    if isinstance(error, EngineDeadError):
        return APIError(503, f"The engine is not available: {error}", code="engine_unavailable")
    return None


def _overloaded_message(reason: str) -> str:
    """The engine's reason as one sentence that says "overloaded" once (the front end's already does)."""
    if "overloaded" not in reason:
        reason = f"the server is overloaded: {reason}"
    return reason[:1].upper() + reason[1:].rstrip(".") + "."


def _rejection(error: RequestRejectedError | ToolUseError) -> APIError:
    return APIError(400, str(error), param=error.param, code=error.code)


@contextmanager
def rejections_as_400() -> Iterator[None]:
    """The input processor's and tool use's refusals, as the 400 the client sees."""
    try:
        yield
    except (RequestRejectedError, ToolUseError) as error:
        raise _rejection(error) from None


# Called with the status of every error response, for the /metrics outcome counter.
ErrorObserver = Callable[[int], None]


def error_response(error: APIError, observe: ErrorObserver) -> JSONResponse:
    """The error's JSON response, counted by `observe`."""
    observe(error.status)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


# Set on an error whose traceback is in the log already (with the request's id): uvicorn logs the
# error Starlette re-raises once more, and that second traceback says nothing new.
_LOGGED = "_batchlm_logged"


def mark_logged(error: BaseException) -> None:
    with suppress(AttributeError):  # an exception type without attributes of its own
        setattr(error, _LOGGED, True)


def was_logged(error: object) -> bool:
    return getattr(error, _LOGGED, False) is True


class ClientDisconnected(Exception):
    """The client went away before the response was complete (nothing more can be sent)."""


def install_error_handlers(app: FastAPI, observe: ErrorObserver) -> None:
    """Route every failure to an OpenAI-shaped response; tracebacks go to the log, never to the client."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc, observe)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        error = validation_error_to_api_error(exc.errors(), required_body_fields(request), {"body": exc.body})
        return error_response(error, observe)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(http_error_to_api_error(request, exc), observe)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        logger.exception(
            "unhandled error serving %s %s (X-Request-Id %s)", request.method, request.url.path, request_id
        )
        mark_logged(exc)
        # Sent from outside every middleware (Starlette's last resort), so the id is added here.
        # Starlette re-raises the error once this answer is sent, and uvicorn then closes the
        # connection: said here, a client does not send its next request down it and get a reset.
        headers = {"Connection": "close"}
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        error = APIError(
            500, "The server had an internal error while processing your request.", headers=headers
        )
        return error_response(error, observe)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def validation_error_to_api_error(
    errors: Sequence[Any], required: Sequence[str] = (), data: Any = UNKNOWN
) -> APIError:
    """Turn pydantic's 422 list into one 400 that names the first offending field. `required` lists the
    body's required fields, named when the whole body is missing. `data`: the input the errors' `loc`s
    point into ({"body": ...}), where known."""
    if not errors:
        return APIError(400, "Invalid request body.")
    first = most_specific(errors, data)
    param = param_from_loc(first.get("loc", ()), data)
    kind = first.get("type", "")
    if kind == "missing" and param is None:
        names = ", ".join(f"'{name}'" for name in required) or "a JSON object"
        return APIError(
            400,
            f"The request body is empty: missing required parameter {names}.",
            required[0] if required else None,
        )
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "malformed JSON")
        return APIError(400, f"The request body is not valid JSON: {detail}.")
    if kind == "string_unicode" and param is None:  # pydantic's word for a key with a lone surrogate
        return APIError(
            400, "A key of the request body contains a lone UTF-16 surrogate (not valid Unicode)."
        )
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param)
    if param is None:
        return APIError(400, "The request body must be a JSON object (send Content-Type: application/json).")
    return APIError(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param)


def required_body_fields(request: Request) -> list[str]:
    """The required fields of the JSON body model of the route that `request` matched (none if unknown)."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(body_field, "field_info", None), "annotation", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [name for name, field in model.model_fields.items() if field.is_required()]


def http_error_to_api_error(request: Request, exc: StarletteHTTPException) -> APIError:
    if exc.status_code == 404:
        return APIError(404, f"Unknown route: {request.method} {request.url.path}", code="unknown_url")
    if exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    elif exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's own text ("There was an error parsing the body") does not say what is wrong.
        message = f"The request body could not be parsed as JSON: {_unparsable_reason(exc.__cause__)}."
    else:
        message = str(exc.detail)
    return APIError(exc.status_code, message, headers=dict(exc.headers or {}))


def _unparsable_reason(cause: BaseException) -> str:
    """Why Python's JSON parser refused a body that was not malformed JSON as such."""
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at position {cause.start})"
    if isinstance(cause, RecursionError):
        return "its arrays or objects nest too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return f"a number in it has more than {sys.get_int_max_str_digits()} digits"
    return "it could not be parsed"
