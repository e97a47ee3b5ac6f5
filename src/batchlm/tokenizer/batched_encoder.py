"""Tokenizing many texts under an event loop: on the loop itself within a small time budget (a lone
request skips the thread hand-off, and the first requests of a burst reach the engine at once), and
beyond it the texts of requests that arrive together in one call of the Rust tokenizer from one worker
thread, which encodes them on all cores with the GIL released. (One thread per request was slower under
a burst: every thread needs the GIL around its call, and while the event loop is busy each hand-off
waits for the switch interval.)"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Any

# Tokenizing on the event loop is allowed for up to INLINE_BUDGET_S in every INLINE_WINDOW_S. A worker's
# ids come back only after the loop has taken in every request of a burst (tens of ms for hundreds of
# requests), so without this the engine would wait that long for the first ones; the budget keeps the
# rest of a burst on the worker, where it is tokenized on all cores.
INLINE_BUDGET_S = 0.005
INLINE_WINDOW_S = 0.05
# Texts longer than this always go to the worker, whatever is left of the inline budget: tokenizing one
# takes milliseconds, and every other request (and /health) waits while the event loop does it.
INLINE_MAX_CHARS = 16_384


class BatchedEncoder:
    """Tokenizes on the event loop within its time budget; beyond it, in a worker thread, every text
    queued since the worker's previous batch started, in one call of the tokenizer's encode_many.
    Bound to one event loop."""

    def __init__(
        self,
        tokenizer: Any,
        loop: asyncio.AbstractEventLoop,
        inline_budget_s: float = INLINE_BUDGET_S,
        inline_window_s: float = INLINE_WINDOW_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.tokenizer = tokenizer
        self._clock = clock
        self.loop = loop
        self._queued: list[tuple[str, bool, asyncio.Future[list[int]]]] = []
        self._worker: asyncio.Task[None] | None = None
        self._inline_budget_s = inline_budget_s
        self._inline_window_s = inline_window_s
        # The current inline window: when it began, and the seconds of tokenizing spent in it.
        self._window_start = float("-inf")
        self._inline_spent = 0.0

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        started = self._clock()
        if started - self._window_start >= self._inline_window_s:
            self._window_start, self._inline_spent = started, 0.0
        if self._inline_spent < self._inline_budget_s and len(text) <= INLINE_MAX_CHARS:
            try:
                return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
            finally:
                self._inline_spent += self._clock() - started
        future: asyncio.Future[list[int]] = self.loop.create_future()
        self._queued.append((text, add_special_tokens, future))
        if self._worker is None or self._worker.done():
            self._worker = self.loop.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            texts = [(text, add_special_tokens) for text, add_special_tokens, _ in batch]
            results = await asyncio.to_thread(self._encode_all, texts)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():  # its request was cancelled (the client left)
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _encode_all(self, texts: list[tuple[str, bool]]) -> list[list[int] | Exception]:
        """In the worker thread: one encode_many call per add_special_tokens value; if a call fails,
        each of its texts is encoded on its own, so one bad text fails only its own request."""
        results: list[list[int] | Exception] = [[] for _ in texts]
        for flag in (True, False):
            indices = [i for i, (_, add_special_tokens) in enumerate(texts) if add_special_tokens is flag]
            if not indices:
                continue
            try:
                encoded = self.tokenizer.encode_many([texts[i][0] for i in indices], add_special_tokens=flag)
                for i, ids in zip(indices, encoded, strict=True):
                    results[i] = list(ids)
            except Exception:
                for i in indices:
                    try:
                        results[i] = list(self.tokenizer.encode(texts[i][0], add_special_tokens=flag))
                    except Exception as error:
                        results[i] = error
        return results


_encoders: weakref.WeakKeyDictionary[Any, BatchedEncoder] = weakref.WeakKeyDictionary()


def batched_encoder(tokenizer: Any) -> BatchedEncoder:
    """The tokenizer's BatchedEncoder on the running event loop."""
    loop = asyncio.get_running_loop()
    encoder = _encoders.get(tokenizer)
    if encoder is None or encoder.loop is not loop:
        encoder = _encoders[tokenizer] = BatchedEncoder(tokenizer, loop)
    return encoder
