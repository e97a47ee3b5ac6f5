"""Async plumbing of the handlers: racing work against the client's disconnect, merging the outputs of
several generations, and Server-Sent Events framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from batchlm.outputs import RequestOutput
from batchlm.server.errors import ClientDisconnected
from batchlm.server.generation import Generation

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: str | dict[str, Any]) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also on our own cancellation: neither task may outlive this call.
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if not task.cancelled() and task.exception() is None:
        return task.result()
    if task.cancelled():
        raise ClientDisconnected()
    raise task.exception()  # type: ignore[misc]


async def close_all(generations: Sequence[Generation]) -> None:
    for generation in generations:
        await generation.close()


async def merge_outputs(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(position of the generation, delta) as they arrive, until every generation has finished.
    An error of any generation (APIError or other) is raised here; the caller closes the generations."""
    if len(generations) == 1:
        while (output := await generations[0].next()) is not None:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(position: int, generation: Generation) -> None:
        try:
            while (output := await generation.next()) is not None:
                queue.put_nowait((position, output))
            queue.put_nowait((position, None))
        except Exception as error:  # handed to the consumer, which raises it
            queue.put_nowait((position, error))

    pumps = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(pumps)
        while remaining:
            position, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                remaining -= 1
            else:
                yield position, item
    finally:
        for running in pumps:
            running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pumps, return_exceptions=True)
