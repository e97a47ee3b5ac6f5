"""A grammar backend whose matchers live in a child process: the engine's process keeps stand-ins and
each call is a typed message on a socket pair, so neither side's Python waits for the other's GIL
(BENCHMARKS.md, "A process of their own"). The child writes masks straight into shared memory when the
caller's buffer is there (`shared_array`), else into a scratch segment copied out after its answer.
With SharedWords, it also takes a step's tokens from its token ring once they land and says when the
masks are written, without the engine's process in between (`TokenLanding`, `RemoteBatch.step_landed`).

The child (structured.mask_process_child) exits when its socket closes, so it never outlives the
engine. Linux only (it attaches shared memory through /dev/shm)."""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import itertools
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarMatcher
from batchlm.structured.mask_process_child import CHILD_COMMAND
from batchlm.structured.process_messages import (
    LANDING_TIMEOUT_S,
    Answer,
    BackendSpec,
    BuildBackend,
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
)
from batchlm.structured.shared_words import SharedWords, TokenLanding, release_segment

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
# How long a failed call waits for a dead child's exit code, to name it.
EXIT_CODE_WAIT_S = 1.0
# Slots of the token ring (see ProcessBackend.landing).
TOKEN_SLOTS = 4


class MaskProcessError(RuntimeError):
    """The mask process failed a call, or is gone."""


class RemoteMatcher:
    """The engine's stand-in for a matcher in the child."""

    def __init__(self, backend: ProcessBackend, matcher_id: int) -> None:
        self._backend = backend
        self.matcher_id = matcher_id

    def __del__(self) -> None:
        self._backend.forgotten_matchers.append(self.matcher_id)

    def fill_bitmask(self, row: np.ndarray) -> None:
        self._backend.fill_bitmasks([self], row.reshape(1, -1))

    def accept(self, token_id: int) -> bool:
        return self._backend.advance([self], [[token_id]])[0]

    @property
    def is_terminated(self) -> bool:
        return self._backend.call(Call(matcher_ids=(self.matcher_id,), ask_terminated=True)).terminated[0]


class RemoteBatch:
    """The engine's stand-in for a prepared batch in the child. Keeps its matchers' stand-ins alive:
    the child's batch uses their matchers."""

    def __init__(self, backend: ProcessBackend, batch_id: int, matchers: list[RemoteMatcher]) -> None:
        self._backend = backend
        self.batch_id = batch_id
        self.matchers = matchers

    def __del__(self) -> None:
        self._backend.forgotten_batches.append(self.batch_id)

    def advance_one(self, token_ids: list[int]) -> list[bool]:
        return self._backend.call(Call(batch_id=self.batch_id, one_each=list(token_ids))).accepted

    def fill(self, bitmask: np.ndarray) -> None:
        self._backend.call_filling(Call(batch_id=self.batch_id), bitmask)

    def step(self, token_ids: list[int], bitmask: np.ndarray) -> list[bool]:
        return self._backend.call_filling(Call(batch_id=self.batch_id, one_each=list(token_ids)), bitmask)

    def step_landed(
        self, landed: LandedTokens, token_rows: tuple[int, ...], bitmask: np.ndarray, release: int | None
    ) -> list[bool]:
        """step with the tokens the child waits for itself (TokenLanding), row i's at token_rows[i];
        with `release`, the child also sets WRITTEN to it once the masks are written."""
        call = Call(batch_id=self.batch_id, landed=landed, token_rows=token_rows, release=release)
        return self._backend.call_filling(call, bitmask)

    def post_landed(
        self, landed: LandedTokens, token_rows: tuple[int, ...], bitmask: np.ndarray, release: int | None
    ) -> Future[Answer]:
        """step_landed without waiting for the answer; `bitmask` must be shared memory from the
        backend (ProcessBackend.holds)."""
        call = Call(batch_id=self.batch_id, landed=landed, token_rows=token_rows, release=release)
        return self._backend.post_filling(call, bitmask)


class ProcessBackend:
    """A GrammarBackend run by a child process (started here; it builds the real backend with
    `build(spec)`)."""

    def __init__(
        self,
        spec: BackendSpec,
        build: BuildBackend,
        words: SharedWords | None = None,
        landing_timeout_s: float = LANDING_TIMEOUT_S,
    ) -> None:
        # A fresh interpreter, not multiprocessing's spawn, which would import the caller's __main__.
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-c", CHILD_COMMAND, str(theirs.fileno())]
        self._process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(Start(spec, build, words.name if words is not None else None, landing_timeout_s))
        self.words = words
        # Sends from any thread, in order; the answers' futures, oldest first (see post).
        self._send_lock = threading.Lock()
        self._answers: collections.deque[Future[Answer]] = collections.deque()
        self._gone: MaskProcessError | None = None
        self._scratch_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._ids = itertools.count(1)
        # Stand-ins collected on any thread, told to the child with the next message (deque: atomic).
        self.forgotten_matchers: collections.deque[int] = collections.deque()
        self.forgotten_batches: collections.deque[int] = collections.deque()
        self._segments: dict[str, tuple[SharedMemory, int]] = {}  # name -> segment, its address
        self._scratch: SharedMemory | None = None
        # The token ring: TOKEN_SLOTS rows of int64 token ids, in turn (grown as batches grow).
        self._ring: SharedMemory | None = None
        self._ring_tokens: np.ndarray | None = None
        self._landed_tickets = itertools.count(1)
        self._retired: list[SharedMemory] = []
        self._closed = False
        # Segments unlinked and the child stopped at exit too (an engine is seldom closed).
        atexit.register(self.close)
        ready = self._receive()
        if not isinstance(ready, Ready):
            self.close()
            raise MaskProcessError(f"the grammar mask process did not start: {_failure(ready)}")
        self.bitmask_words = ready.bitmask_words
        self.eos_token_ids = ready.eos_token_ids
        self._reader = threading.Thread(target=self._read_answers, name="grammar-mask-answers", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def matcher(self, spec: StructuredOutputs) -> RemoteMatcher:
        """Never raises GrammarError: the API edge compiled the spec, and a grammar only this
        tokenizer rejects ends its sequence in the child (which logs why)."""
        matcher_id = next(self._ids)
        self._send(NewMatcher(matcher_id, spec))
        return RemoteMatcher(self, matcher_id)

    def batch(self, matchers: Sequence[GrammarMatcher]) -> RemoteBatch:
        ours = self._ours(matchers)
        batch_id = next(self._ids)
        self._send(NewBatch(batch_id, tuple(m.matcher_id for m in ours)))
        return RemoteBatch(self, batch_id, ours)

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher], bitmask: np.ndarray) -> None:
        self.call_filling(Call(matcher_ids=self._ids_of(matchers)), bitmask)

    def advance(self, matchers: Sequence[GrammarMatcher], new_tokens: Sequence[Sequence[int]]) -> list[bool]:
        tokens = [list(t) for t in new_tokens]
        return self.call(Call(matcher_ids=self._ids_of(matchers), new_tokens=tokens)).accepted

    def advance_and_fill(
        self, matchers: Sequence[GrammarMatcher], new_tokens: Sequence[Sequence[int]], bitmask: np.ndarray
    ) -> list[bool]:
        tokens = [list(t) for t in new_tokens]
        return self.call_filling(Call(matcher_ids=self._ids_of(matchers), new_tokens=tokens), bitmask)

    def shared_array(self, rows: int) -> np.ndarray:
        """[rows, bitmask_words] int32 in shared memory: masks filled into it need no copy. It lives
        until close()."""
        segment = SharedMemory(create=True, size=max(1, rows * self.bitmask_words * 4))
        array = np.ndarray((rows, self.bitmask_words), dtype=np.int32, buffer=segment.buf)
        self._segments[segment.name] = (segment, array.ctypes.data)
        return array

    def landing(self, count: int) -> TokenLanding:
        """The next slot of the token ring for a step's `count` token ids, and its ticket. A slot is
        written again TOKEN_SLOTS landings later, when the masks made from it were long used."""
        assert self.words is not None, "landing tokens takes the engine's SharedWords"
        ticket = next(self._landed_tickets)
        ring = self._ring_tokens
        if ring is None or ring.shape[1] < count:
            ring = self._grow_ring(count)
        assert self._ring is not None
        slot = ticket % TOKEN_SLOTS
        offset = slot * ring.shape[1] * 8
        return TokenLanding(ring[slot, :count], ring, LandedTokens(self._ring.name, offset, count, ticket))

    def _grow_ring(self, count: int) -> np.ndarray:
        old = self._ring
        width = max(count, 2 * (self._ring_tokens.shape[1] if self._ring_tokens is not None else 0), 64)
        self._ring = SharedMemory(create=True, size=TOKEN_SLOTS * width * 8)
        self._ring_tokens = np.ndarray((TOKEN_SLOTS, width), dtype=np.int64, buffer=self._ring.buf)
        if old is not None:
            self._send(Forget(segments=(old.name,)))
            self._retired.append(old)  # freed at close: a device may hold it page-locked
        return self._ring_tokens

    def call_filling(self, call: Call, bitmask: np.ndarray) -> list[bool]:
        """A call that fills `bitmask` ([rows, words] int32, C-contiguous): in place when it lies in
        shared memory from here, else through the scratch segment."""
        self._check_mask_shape(bitmask)
        rows = bitmask.shape[0]
        target = self._shared_target(bitmask)
        if target is not None:
            return self.call(_with_fill(call, target)).accepted
        with self._scratch_lock:  # the scratch segment is read before another call writes it
            scratch = self._scratch_for(rows * self.bitmask_words * 4)
            answer = self.call(_with_fill(call, MaskTarget(scratch.name, 0, rows)))
            np.copyto(bitmask, np.ndarray(bitmask.shape, dtype=np.int32, buffer=scratch.buf))
        return answer.accepted

    def post_filling(self, call: Call, bitmask: np.ndarray) -> Future[Answer]:
        """call_filling without waiting: `bitmask` must be shared memory from here (shared_array)."""
        self._check_mask_shape(bitmask)
        target = self._shared_target(bitmask)
        if target is None:
            raise ValueError("a posted call fills shared memory from this backend only")
        return self.post(_with_fill(call, target))

    def holds(self, bitmask: np.ndarray) -> bool:
        """Whether masks filled into `bitmask` are written in place (shared memory from here)."""
        return self._shared_target(bitmask) is not None

    def call(self, call: Call) -> Answer:
        return self.post(call).result()

    def post(self, call: Call) -> Future[Answer]:
        """Send a call; its answer (or the child's failure) resolves the future. Answers come in the
        order of the calls, read by one thread, so calls may be in flight from several."""
        future: Future[Answer] = Future()
        with self._send_lock:
            if self._gone is not None:
                future.set_exception(self._gone)
                return future
            self._answers.append(future)
            self._send_locked(call)
        return future

    def _read_answers(self) -> None:
        """The answers' one reader: each resolves the oldest call's future; at the socket's end every
        call still waiting fails."""
        while True:
            try:
                message: FromChild = self._conn.recv()
            except (EOFError, OSError):
                break
            future = self._answers.popleft()
            if isinstance(message, Answer):
                future.set_result(message)
            else:
                future.set_exception(
                    MaskProcessError(f"the grammar mask process failed: {_failure(message)}")
                )
        gone = self._exited()
        with self._send_lock:
            self._gone = gone
            waiting = list(self._answers)
            self._answers.clear()
        for future in waiting:
            future.set_exception(gone)

    def _check_mask_shape(self, bitmask: np.ndarray) -> None:
        assert bitmask.dtype == np.int32 and bitmask.flags["C_CONTIGUOUS"]
        assert bitmask.ndim == 2 and bitmask.shape[1] == self.bitmask_words

    def _shared_target(self, bitmask: np.ndarray) -> MaskTarget | None:
        address = bitmask.ctypes.data
        for name, (segment, base) in self._segments.items():
            if base <= address and address + bitmask.nbytes <= base + segment.size:
                return MaskTarget(name, address - base, bitmask.shape[0])
        return None

    def _scratch_for(self, nbytes: int) -> SharedMemory:
        scratch = self._scratch
        if scratch is not None and scratch.size >= nbytes:
            return scratch
        self._scratch = SharedMemory(
            create=True, size=max(nbytes, 2 * (scratch.size if scratch else 0), 4096)
        )
        if scratch is not None:
            self._send(Forget(segments=(scratch.name,)))
            release_segment(scratch)
        return self._scratch

    def _ours(self, matchers: Sequence[GrammarMatcher]) -> list[RemoteMatcher]:
        ours = [m for m in matchers if isinstance(m, RemoteMatcher)]
        if len(ours) != len(matchers):
            raise TypeError("a process backend's calls take only its own matchers")
        return ours

    def _ids_of(self, matchers: Sequence[GrammarMatcher]) -> tuple[int, ...]:
        return tuple(m.matcher_id for m in self._ours(matchers))

    def _send(self, message: ToChild) -> None:
        with self._send_lock:
            if self._gone is not None:
                raise self._gone
            self._send_locked(message)

    def _send_locked(self, message: ToChild) -> None:
        forgotten = _drain(self.forgotten_matchers), _drain(self.forgotten_batches)
        try:
            if forgotten[0] or forgotten[1]:
                self._conn.send(Forget(forgotten[0], forgotten[1]))
            self._conn.send(message)
        except (BrokenPipeError, OSError) as exc:
            raise MaskProcessError(f"the grammar mask process is gone ({exc})") from None

    def _receive(self) -> FromChild:
        try:
            message: FromChild = self._conn.recv()
        except (EOFError, OSError):
            raise self._exited() from None
        return message

    def _exited(self) -> MaskProcessError:
        """The error of a child whose socket has ended, naming its exit code once it has one."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=EXIT_CODE_WAIT_S)
        return MaskProcessError(f"the grammar mask process exited (exit code {self._process.returncode})")

    def close(self) -> None:
        """Stop the child and free the shared segments (arrays from shared_array must be unused)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        with contextlib.suppress(MaskProcessError):
            self._send(Stop())
        try:
            self._process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._conn.close()
        if self._reader is not None:
            self._reader.join(timeout=STOP_GRACE_S)
        for segment, _ in self._segments.values():
            release_segment(segment)
        self._segments.clear()
        for retired in (self._scratch, self._ring, *self._retired):
            if retired is not None:
                release_segment(retired)
        self._scratch = self._ring = None
        self._retired.clear()


def _with_fill(call: Call, target: MaskTarget) -> Call:
    return dataclasses.replace(call, fill=target)


def _drain(ids: collections.deque[int]) -> tuple[int, ...]:
    drained: list[int] = []
    with contextlib.suppress(IndexError):
        while True:
            drained.append(ids.popleft())
    return tuple(drained)


def _failure(message: FromChild) -> str:
    return message.message if isinstance(message, Failed) else f"unexpected {type(message).__name__}"
