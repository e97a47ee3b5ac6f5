"""A stored response's input items as OpenAI lists them: each with an id, a message's text as parts,
a status; and a page of them for GET /v1/responses/{id}/input_items (a cursor list)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from batchlm.server.errors import APIError

# The prefix of the id an input item that came without one is given, by its type (as OpenAI's).
ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
# GET /v1/responses/{id}/input_items: items on a page by default, and at most.
DEFAULT_PAGE = 20
MAX_PAGE = 100


def stored_input_items(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as they are kept and listed (OpenAI's form): each with an id (its own, else a new
    one), a message's text content as a list of parts and a status. What a continuation reads of them
    is unchanged (the same text, the same calls). An id the input already gave an item (the same item
    sent twice) is not given again: a page's `after` names one item."""
    kept: list[dict[str, Any]] = []
    ids: set[str] = set()
    for item in items:
        if isinstance(item, dict):
            item = _stored_input_item(item, ids)
            ids.add(item["id"])
        kept.append(item)
    return kept


def _stored_input_item(item: dict[str, Any], taken: set[str]) -> dict[str, Any]:
    kind = item.get("type", "message")
    item_id = item.get("id")
    if not isinstance(item_id, str) or item_id in taken:
        item_id = f"{ITEM_ID_PREFIXES.get(kind, 'item')}_{uuid.uuid4().hex}"
    kept = {"id": item_id, "type": kind, **{key: value for key, value in item.items() if key != "id"}}
    content = kept.get("content")
    if kind == "message" and isinstance(content, str):
        if kept.get("role") == "assistant":
            kept["content"] = [{"type": "output_text", "text": content, "annotations": []}]
        else:
            kept["content"] = [{"type": "input_text", "text": content}]
    if kind in ("message", "function_call", "function_call_output") and kept.get("status") is None:
        kept["status"] = "completed"
    return kept


def check_page_query(limit: int, order: str) -> None:
    """400 naming `limit` or `order` out of range."""
    if not 1 <= limit <= MAX_PAGE:
        raise APIError(400, f"'limit' must be between 1 and {MAX_PAGE}, got {limit}.", param="limit")
    if order not in ("asc", "desc"):
        raise APIError(400, f"'order' must be 'asc' or 'desc', got {order!r}.", param="order")


def page_of(
    items: list[dict[str, Any]], response_id: str, limit: int, order: str, after: str | None
) -> dict[str, Any]:
    """OpenAI's cursor list of the items: `after` is the id of the item the previous page ended with."""
    if order == "desc":
        items = items[::-1]
    start = 0
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise APIError(
                400, f"'after': no input item of response '{response_id}' has id '{after}'.", param="after"
            )
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(items),
    }
