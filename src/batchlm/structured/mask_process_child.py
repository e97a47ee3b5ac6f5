"""The grammar mask process itself (`python -c CHILD_COMMAND <socket fd>`): it builds the real grammar
backend, then applies the engine's messages in order and answers its calls (structured.process_messages).
It exits at Stop or when its socket closes."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

import numpy as np

from batchlm.structured.backend import (
    EndingMatcher,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    MatcherBatch,
)
from batchlm.structured.process_messages import (
    LANDED_WORD,
    LANDING_TIMEOUT_S,
    SHARED_WORDS_BYTES,
    WRITTEN_WORD,
    Answer,
    Call,
    Failed,
    Forget,
    FromChild,
    LandedTokens,
    MaskTarget,
    NewBatch,
    NewMatcher,
    Ready,
    Start,
    Stop,
    ToChild,
    reached,
)

logger = logging.getLogger(__name__)

CHILD_COMMAND = "from batchlm.structured.mask_process_child import main; main()"
# Waiting for landed tokens: spins first beside an accelerator (its cores are free), then polls.
LANDING_SPINS = 20_000
LANDING_POLL_S = 50e-6
# Where POSIX shared memory segments appear as files (Linux).
SHARED_MEMORY_DIR = "/dev/shm"


class LandingError(RuntimeError):
    """A step's tokens did not land."""


class _Child:
    """The real backend and its matchers and batches, by the ids the engine's side gave them."""

    def __init__(
        self,
        backend: GrammarBackend,
        words: np.ndarray | None = None,
        spin: bool = False,
        landing_timeout_s: float = LANDING_TIMEOUT_S,
    ) -> None:
        self.backend = backend
        self._landing_timeout_s = landing_timeout_s
        # SharedWords' two counters, if the engine made them; spin: wait for tokens busily at first.
        self.words = words
        self._spins = LANDING_SPINS if spin else 0
        self._fence = threading.Lock()
        self.matchers: dict[int, GrammarMatcher] = {}
        self.batches: dict[int, MatcherBatch] = {}
        self.segments: dict[str, mmap.mmap] = {}
        # A failure of a message nobody waits for, told with the next call's answer.
        self.failure: str | None = None

    def handle(self, message: ToChild) -> FromChild | None:
        try:
            if isinstance(message, Call):
                return self._call(message)
            self._apply(message)
        except Exception as exc:  # told to the engine, whose step fails with it
            logger.exception("grammar mask process: %s failed", type(message).__name__)
            failure = f"{type(message).__name__}: {exc}"
            if isinstance(message, Call):
                return Failed(failure)
            self.failure = self.failure or failure
        return None

    def _apply(self, message: ToChild) -> None:
        if isinstance(message, NewMatcher):
            self.matchers[message.matcher_id] = self._matcher(message)
        elif isinstance(message, NewBatch):
            matchers = [self.matchers[i] for i in message.matcher_ids]
            self.batches[message.batch_id] = self.backend.batch(matchers)
        elif isinstance(message, Forget):
            for matcher_id in message.matcher_ids:
                self.matchers.pop(matcher_id, None)
            for batch_id in message.batch_ids:
                self.batches.pop(batch_id, None)
            for name in message.segments:
                segment = self.segments.pop(name, None)
                if segment is not None:
                    with contextlib.suppress(BufferError):  # a view of it still alive: freed with it
                        segment.close()

    def _matcher(self, message: NewMatcher) -> GrammarMatcher:
        try:
            return self.backend.matcher(message.spec)
        except GrammarError as exc:
            logger.error("a grammar does not compile in the engine (%s); its sequence ends now", exc)
            return EndingMatcher(self.backend.eos_token_ids)

    def _call(self, call: Call) -> FromChild:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            return Failed(failure)
        bitmask = self._view(call.fill) if call.fill is not None else None
        if call.batch_id is not None:
            batch = self.batches[call.batch_id]
            accepted: list[bool] = []
            tokens = call.one_each if call.landed is None else self._landed(call.landed, call.token_rows)
            if tokens is not None:
                accepted = batch.advance_one(tokens)
            if bitmask is not None:
                batch.fill(bitmask)
            if call.release is not None:
                self._publish_written(call.release)
            return Answer(len(accepted), _rejected(accepted))
        matchers = [self.matchers[i] for i in call.matcher_ids]
        accepted = [True] * len(matchers)
        if call.new_tokens is not None:
            accepted = self.backend.advance(matchers, call.new_tokens)
        if bitmask is not None:
            self.backend.fill_bitmasks(matchers, bitmask)
        terminated = tuple(m.is_terminated for m in matchers) if call.ask_terminated else ()
        return Answer(len(matchers), _rejected(accepted), terminated)

    def _view(self, target: MaskTarget) -> np.ndarray:
        shape = (target.rows, self.backend.bitmask_words)
        return np.ndarray(shape, dtype=np.int32, buffer=self._segment(target.segment), offset=target.offset)

    def _segment(self, name: str) -> mmap.mmap:
        segment = self.segments.get(name)
        if segment is None:
            segment = self.segments[name] = _attach(name)
        return segment

    def _landed(self, landed: LandedTokens, rows: tuple[int, ...]) -> list[int]:
        """The tokens of a step, once the LANDED word says they are there."""
        words = self.words
        if words is None:
            raise LandingError("landed tokens without the engine's shared words")
        spins, deadline = self._spins, 0.0
        while not reached(int(words[LANDED_WORD]), landed.ticket):
            if spins:
                spins -= 1
                continue
            now = time.monotonic()
            if not deadline:
                deadline = now + self._landing_timeout_s
            elif now > deadline:
                raise LandingError(f"the tokens of landing {landed.ticket} never landed")
            time.sleep(LANDING_POLL_S)
        with self._fence:  # the word was read before the tokens (arm64 may reorder loads)
            pass
        segment = self._segment(landed.segment)
        tokens = np.ndarray((landed.count,), dtype=np.int64, buffer=segment, offset=landed.offset)
        picked: list[int] = tokens[list(rows)].tolist()
        return picked

    def _publish_written(self, ticket: int) -> None:
        assert self.words is not None
        self.words[2:4].view(np.float64)[0] = time.perf_counter()
        with self._fence:  # the masks before the word (arm64)
            pass
        self.words[WRITTEN_WORD] = ticket & 0xFFFFFFFF


def _rejected(accepted: list[bool]) -> tuple[int, ...]:
    if all(accepted):
        return ()
    return tuple(row for row, ok in enumerate(accepted) if not ok)


def _attach(name: str) -> mmap.mmap:
    """A segment the engine's side made (and will unlink), mapped through its file: attaching through
    SharedMemory would start a resource tracker here that claims the segment as this process's."""
    fd = os.open(os.path.join(SHARED_MEMORY_DIR, name), os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def main() -> None:
    """The mask process (CHILD_COMMAND): build the backend as Start says, answer Ready, then serve
    messages until Stop or the socket's end."""
    conn = Connection(int(sys.argv[1]))
    # Ctrl-C reaches the whole process group; the engine decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start: Start = conn.recv()
    except (EOFError, OSError):
        return
    level = start.spec.log_level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        backend = start.build(start.spec)
    except Exception as exc:
        logger.exception("grammar mask process: the backend did not build")
        conn.send(Failed(f"the grammar backend did not build: {exc}"))
        return
    conn.send(Ready(backend.bitmask_words, backend.eos_token_ids))
    words = None
    if start.words is not None:
        words = np.ndarray((SHARED_WORDS_BYTES // 4,), dtype=np.uint32, buffer=_attach(start.words))
    child = _Child(backend, words, start.spec.on_accelerator, start.landing_timeout_s)
    while True:
        try:
            message: ToChild = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, Stop):
            return
        answer = child.handle(message)
        if answer is not None:
            conn.send(answer)
