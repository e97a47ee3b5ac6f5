"""The HTTP routes. Each is thin: it resolves the app's state and hands the work to a serving module."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from batchlm import __version__
from batchlm.server.errors import APIError
from batchlm.server.prompts import detokenize, tokenize, tokenizer_info
from batchlm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from batchlm.server.protocol_responses import ResponseObject, ResponsesRequest
from batchlm.server.request_params import check_unicode
from batchlm.server.response_items import DEFAULT_PAGE
from batchlm.server.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    TokenizerInfo,
)
from batchlm.server.serving_chat import create_chat_completion
from batchlm.server.serving_completions import create_completion
from batchlm.server.serving_responses import create_response
from batchlm.server.state import ServerState, get_state
from batchlm.server.stored_lookups import (
    cancel_stored_response,
    delete_stored_response,
    input_items_page,
    stored_response,
)

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)
}
router = APIRouter()


def _generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": "JSON, or SSE chunks with stream"}, **ERRORS}


@router.get(
    "/health", summary="200 when the engine serves requests; 503 while loading, dead or shutting down"
)
async def health(request: Request) -> JSONResponse:
    state = get_state(request)
    engine = state.engine
    if engine.is_dead:
        status = "dead"
    elif state.shutting_down:
        status = "shutting_down"
    elif not engine.is_ready or state.starting_api_servers:
        status = "loading"
    else:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": status}, status_code=503)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics", summary="Prometheus metrics (text exposition format)")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: ServerState, requested: str | None = None) -> ModelCard:
    info = state.ready_model(requested)
    return ModelCard(
        id=info.served_model_name, created=state.started_at, max_model_len=info.facts.max_model_len
    )


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(get_state(request))])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(request: Request, model_id: str) -> ModelCard:
    return _model_card(get_state(request), model_id)


@router.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse))
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    check_unicode(body)
    return await create_chat_completion(request, body)


@router.post("/v1/completions", responses=_generation_responses(CompletionResponse))
async def completions(request: Request, body: CompletionRequest) -> Response:
    check_unicode(body)
    return await create_completion(request, body)


@router.post("/v1/responses", responses=_generation_responses(ResponseObject))
async def responses(request: Request, body: ResponsesRequest) -> Response:
    check_unicode(body)
    return await create_response(request, body)


@router.get("/v1/responses/{response_id}", responses=ERRORS, summary="A stored response")
async def retrieve_response(request: Request, response_id: str, stream: bool = False) -> JSONResponse:
    if stream:  # a JSON body read as events would be an empty stream, no error
        raise APIError(
            400,
            "'stream' is not supported: a stored response is read back whole (only background "
            "responses, which this server does not run, stream again).",
            param="stream",
        )
    return JSONResponse((await stored_response(get_state(request).responses, response_id)).response)


@router.delete("/v1/responses/{response_id}", responses=ERRORS, summary="Delete a stored response")
async def delete_response(request: Request, response_id: str) -> JSONResponse:
    await delete_stored_response(get_state(request).responses, response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@router.get(
    "/v1/responses/{response_id}/input_items",
    responses=ERRORS,
    summary="A stored response's input items, a page at a time (`after` the last id of the page before)",
)
async def list_input_items(
    request: Request,
    response_id: str,
    limit: int = DEFAULT_PAGE,
    order: str = "desc",
    after: str | None = None,
) -> JSONResponse:
    # `include` is accepted and adds nothing: the items are text, whole.
    page = await input_items_page(get_state(request).responses, response_id, limit, order, after)
    return JSONResponse(page)


@router.post(
    "/v1/responses/{response_id}/cancel",
    responses=ERRORS,
    summary="Cancel a background response: none runs here, so a stored response is a 400",
)
async def cancel_response(request: Request, response_id: str) -> JSONResponse:
    await cancel_stored_response(get_state(request).responses, response_id)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize_route(request: Request, body: TokenizeRequest) -> TokenizeResponse:
    check_unicode(body)
    return await tokenize(get_state(request), body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize_route(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    check_unicode(body)
    return await detokenize(get_state(request), body)


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=ERRORS)
async def tokenizer_info_route(request: Request) -> TokenizerInfo:
    return tokenizer_info(get_state(request))
