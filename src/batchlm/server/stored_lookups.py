"""The response store's lookups as the routes make them: in a thread (the store's lock may be held by a
batch being written, and a long conversation takes a while to read), a response or item not stored an
HTTP 404 or 400, and a database that cannot be read or written (a full disk, another process's lock held
past LOCK_TIMEOUT_S) a 503 that says so."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from batchlm.server.errors import APIError
from batchlm.server.response_items import check_page_query, page_of
from batchlm.server.response_store import ResponseStore, StoredResponse

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


async def stored_response(store: ResponseStore | None, response_id: str) -> StoredResponse:
    """A stored response, or 404."""
    stored = await _off_loop(store, store.get, response_id) if store is not None else None
    if stored is None:
        raise _not_stored(response_id)
    return stored


async def delete_stored_response(store: ResponseStore | None, response_id: str) -> None:
    """Delete a stored response, or 404."""
    if store is None or not await _off_loop(store, store.delete, response_id):
        raise _not_stored(response_id)


async def stored_conversation(
    store: ResponseStore | None, previous_id: str | None
) -> list[dict[str, Any]] | None:
    """The stored conversation a request continues (None when it names none). 400 when it is not stored."""
    if previous_id is None:
        return None
    if store is None:
        why = "this server keeps no responses (--stored-responses 0); send the whole conversation in 'input'"
        raise APIError(400, f"'previous_response_id' is not supported: {why}.", param="previous_response_id")
    history = await _off_loop(store, store.conversation, previous_id)
    if history is None:
        message = f"Previous response with id '{previous_id}' not found."
        missing = await _off_loop(store, store.missing_link, previous_id)
        if missing is not None and missing != previous_id:
            message = (
                f"Previous response '{previous_id}' continues response '{missing}', which is no longer "
                "stored (deleted); send the conversation in 'input' instead."
            )
        raise APIError(400, message, param="previous_response_id", code="previous_response_not_found")
    return history


async def stored_items(store: ResponseStore | None, references: dict[int, str]) -> dict[int, dict[str, Any]]:
    """The stored items that `item_reference` input items name ({index in input: id} -> {index: item}).
    400 naming the first reference whose item is not stored."""
    if not references:
        return {}
    if store is None:
        where = f"input[{next(iter(references))}]"
        why = "this server keeps no responses (--stored-responses 0); send the item itself"
        raise APIError(400, f"{where}: item references are not supported: {why}.", param=f"{where}.id")
    found = await _off_loop(store, store.items, references.values())
    for i, item_id in references.items():
        if item_id not in found:
            raise APIError(400, f"Item with id '{item_id}' not found.", param=f"input[{i}].id")
    return {i: found[item_id] for i, item_id in references.items()}


async def input_items_page(
    store: ResponseStore | None, response_id: str, limit: int, order: str, after: str | None
) -> dict[str, Any]:
    """GET /v1/responses/{id}/input_items: a page of the response's input items (response_items.page_of).
    404 for a response not stored; 400 naming a query parameter out of range."""
    check_page_query(limit, order)
    items = (await stored_response(store, response_id)).input_items
    return page_of(items, response_id, limit, order, after)


async def cancel_stored_response(store: ResponseStore | None, response_id: str) -> NoReturn:
    """POST /v1/responses/{id}/cancel: OpenAI cancels background responses alone, and this server runs
    none, so a stored response is a 400 (404 for one not stored)."""
    await stored_response(store, response_id)
    raise APIError(
        400,
        f"Response '{response_id}' cannot be cancelled: only background responses can be, and this server "
        "runs none in the background (a response is answered, and stored, once it is finished).",
        param="response_id",
    )


async def _off_loop(store: ResponseStore, operation: Callable[..., _T], *args: Any) -> _T:
    """`operation(*args)` in a thread; a database that fails it (a full disk, a lock another process
    holds too long, a damaged file) is a 503 saying so, and one line in the log naming it."""
    try:
        return await asyncio.to_thread(operation, *args)
    except sqlite3.Error as error:
        logger.warning("stored responses in %s: %s", store.directory, error)
        raise APIError(
            503, f"The stored responses cannot be read or changed now ({error}); try again later."
        ) from error


def _not_stored(response_id: str) -> APIError:
    return APIError(
        404, f"No response with id '{response_id}' is stored.", param="response_id", code="not_found"
    )
