"""Engine requests as the server drives them: engine errors become APIErrors, a server-side abort is
told apart from cancellation, and closing an unfinished request always aborts it in the engine; the
generations of one HTTP request are primed, merged and closed together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import anyio
from prometheus_client import Gauge

from batchlm.engine.client import EngineClient
from batchlm.engine.input_processor import ValidatedRequest
from batchlm.outputs import FinishReason, RequestOutput
from batchlm.server.errors import APIError, engine_error_to_api_error
from batchlm.server.metrics import RequestRecorder

logger = logging.getLogger(__name__)


def _this_task_is_cancelled() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return bool(cancelling and cancelling())


class InFlight:
    """Generations being served, so that a shutdown can abort the ones that outlive the drain period."""

    def __init__(self, gauge: Gauge) -> None:
        self._generations: dict[str, Generation] = {}
        # Kept equal to len(self); counted up and down (not read at scrape time) so that the
        # gauges of several API-server processes add up.
        self._gauge = gauge

    def add(self, generation: Generation) -> None:
        if generation.request_id not in self._generations:
            self._gauge.inc()
        self._generations[generation.request_id] = generation

    def discard(self, generation: Generation) -> None:
        if self._generations.pop(generation.request_id, None) is not None:
            self._gauge.dec()

    def __len__(self) -> int:
        return len(self._generations)

    async def abort_all(self) -> int:
        generations = list(self._generations.values())
        for generation in generations:
            await generation.abort_by_server()
        return len(generations)


class Generation:
    """Deltas of one engine request. Use `next()` until it returns None, then always `close()`."""

    def __init__(
        self,
        engine: EngineClient,
        request_id: str,
        request: ValidatedRequest,
        recorder: RequestRecorder,
        in_flight: InFlight,
        group_id: str = "",
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = request.prompt_token_ids
        self.recorder = recorder
        self.finished = False
        self._engine = engine
        self._in_flight = in_flight
        self._buffered: RequestOutput | None = None
        self._started = False
        # The engine's stream is over (finished, or it raised): nothing is left to abort.
        self._ended = False
        self._failed = False
        self._closed = False
        self._server_aborted = False
        self._finish_reasons: dict[int, FinishReason] = {}
        try:
            self._stream: AsyncGenerator[RequestOutput, None] = engine.submit(request, request_id, group_id)
        except Exception as error:
            raise self._translate(error) from error
        in_flight.add(self)

    async def prime(self) -> None:
        """Wait for the first output, so that a refused request still gets its HTTP status (429, 400, 503)."""
        self._buffered = await self.next()

    async def next(self) -> RequestOutput | None:
        """The next delta, or None after the last. Raises APIError when the engine refuses or fails."""
        if self._buffered is not None:
            output, self._buffered = self._buffered, None
            return output
        if self.finished:
            return None
        self._started = True
        try:
            output = await self._stream.__anext__()
        except StopAsyncIteration:
            self._ended = True
            raise self._fail(APIError(500, "The engine ended the request without finishing it.")) from None
        except asyncio.CancelledError:
            # An engine may end an aborted request's stream by raising CancelledError in it.
            if self._server_aborted and not _this_task_is_cancelled():
                self._ended = True
                raise self._fail(self._aborted_error()) from None
            raise
        except Exception as error:
            self._ended = True
            raise self._translate(error) from error
        return self._accept(output)

    def _accept(self, output: RequestOutput) -> RequestOutput:
        self.recorder.observe(output)
        # Set first: a finished request needs no abort, even one that finished in error.
        self.finished = self._ended = output.finished
        if output.error is not None:
            raise self._fail(APIError(500, f"The engine failed while generating: {output.error}"))
        for completion in output.outputs:
            if completion.finish_reason is FinishReason.ABORT:
                raise self._fail(self._aborted_error())
            if completion.finish_reason is FinishReason.ERROR:
                raise self._fail(APIError(500, "The engine failed while generating this completion."))
            if completion.finish_reason is not None:
                self._finish_reasons[completion.index] = completion.finish_reason
        return output

    def _aborted_error(self) -> APIError:
        return APIError(503, "The request was aborted by the server (shutting down).", code="aborted")

    def _translate(self, error: Exception) -> Exception:
        """The APIError for the engine's documented errors; anything else is re-raised as is (a 500)."""
        return self._fail(engine_error_to_api_error(error) or error)

    def _fail(self, error: Exception) -> Exception:
        self._failed = True
        return error

    def mark_failed(self) -> None:
        """The HTTP request this generation serves failed and its error was counted: closing the
        generation then counts nothing more (a sibling's failure is no client disconnect)."""
        self._failed = True

    async def abort_by_server(self) -> None:
        self._server_aborted = True
        await self._engine.abort(self.request_id)

    async def close(self) -> None:
        """Idempotent. An unfinished request is aborted in the engine (the client is gone or gave up)."""
        if self._closed:
            return
        self._closed = True
        self._in_flight.discard(self)
        # Shielded: this runs while the handling task is being cancelled (client disconnect).
        with anyio.CancelScope(shield=True):
            if not self._ended:
                await self._close_stream()
                await self._abort_quietly()
        # A failed request was counted where its error was rendered (one that finished in error, an
        # abort or an engine failure, among them); an unstarted one never happened.
        if self._failed:
            return
        if self.finished:
            reasons = self._finish_reasons.values()
            self.recorder.finish(
                FinishReason.LENGTH.value if FinishReason.LENGTH in reasons else FinishReason.STOP.value
            )
        elif self._started:
            self.recorder.finish("client_disconnect")

    async def _abort_quietly(self) -> None:
        try:
            await self._engine.abort(self.request_id)
        except Exception:  # e.g. the engine died meanwhile: nothing is left to abort
            logger.warning("aborting %s failed", self.request_id, exc_info=True)

    async def _close_stream(self) -> None:
        try:
            await self._stream.aclose()
        except Exception:  # the stream is being discarded; its failure changes nothing for the client
            logger.debug("closing the engine stream of %s failed", self.request_id, exc_info=True)


async def prime_all(generations: Sequence[Generation]) -> None:
    """Wait for every generation's first output; on the first failure the others are cancelled."""
    tasks = [asyncio.ensure_future(g.prime()) for g in generations]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_all(generations: Sequence[Generation]) -> None:
    for generation in generations:
        await generation.close()


def mark_all_failed(generations: Sequence[Generation]) -> None:
    for generation in generations:
        generation.mark_failed()


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
