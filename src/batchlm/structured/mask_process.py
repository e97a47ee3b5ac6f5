"""A grammar backend whose matchers live in a child process: the engine's process keeps stand-ins and
each call is a typed message on a socket pair, so neither side's Python waits for the other's GIL
(BENCHMARKS.md, "A process of their own"). The child writes masks straight into shared memory when the
caller's buffer is there (`shared_array`), else into a scratch segment copied out after its answer.
With SharedWords, it also takes a step's tokens from its token ring once they land and says when the
masks are written, without the engine's process in between (`TokenLanding`, `RemoteBatch.step_landed`).

The child exits when its socket closes, so it never outlives the engine. Linux only (shared memory is
attached through /dev/shm)."""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import itertools
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from batchlm.config import EngineConfig
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import (
    EndingMatcher,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    MatcherBatch,
)

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
# How long a failed call waits for a dead child's exit code, to name it.
EXIT_CODE_WAIT_S = 1.0
CHILD_COMMAND = "from batchlm.structured.mask_process import main; main()"
# SharedWords' layout: LANDED and WRITTEN (uint32), then WRITTEN's time (float64).
SHARED_WORDS_BYTES = 16
# Slots of the token ring (see ProcessBackend.landing).
TOKEN_SLOTS = 4
# Waiting for landed tokens: spins first beside an accelerator (its cores are free), then polls.
LANDING_SPINS = 20_000
LANDING_POLL_S = 50e-6
# Tokens that have not landed by then never will: the call fails.
LANDING_TIMEOUT_S = 60.0
# Where POSIX shared memory segments appear as files (Linux).
SHARED_MEMORY_DIR = "/dev/shm"


@dataclass(frozen=True)
class BackendSpec:
    """What building the engine's grammar backend takes (structured.factory's arguments)."""

    config: EngineConfig
    model_dir: Path
    vocab_size: int
    on_accelerator: bool
    eos_token_ids: tuple[int, ...]
    log_level: int


# Builds the real backend in the child: a module-level function, which travels by its name.
BuildBackend = Callable[[BackendSpec], GrammarBackend]


@dataclass(frozen=True)
class Start:
    """The child's first message; words: the SharedWords segment, if the engine made one."""

    spec: BackendSpec
    build: BuildBackend
    words: str | None = None
    landing_timeout_s: float = LANDING_TIMEOUT_S


# Messages to the child. Only a Call is answered; the others take effect in order before later calls.


@dataclass(frozen=True)
class NewMatcher:
    """A matcher at the start of `spec`'s grammar (one that does not compile ends its sequence)."""

    matcher_id: int
    spec: StructuredOutputs


@dataclass(frozen=True)
class NewBatch:
    """These matchers prepared as the rows of a decode batch."""

    batch_id: int
    matcher_ids: tuple[int, ...]


@dataclass(frozen=True)
class Forget:
    """Stand-ins gone on the engine's side, and shared segments it no longer writes through."""

    matcher_ids: tuple[int, ...] = ()
    batch_ids: tuple[int, ...] = ()
    segments: tuple[str, ...] = ()


@dataclass(frozen=True)
class MaskTarget:
    """Where to write [rows, words] int32 masks: a byte offset into a shared segment."""

    segment: str
    offset: int
    rows: int


@dataclass(frozen=True)
class LandedTokens:
    """A step's sampled token ids, int64 [count] at a byte offset of a shared segment, there once
    SharedWords' LANDED word reaches `ticket`."""

    segment: str
    offset: int
    count: int
    ticket: int


@dataclass(frozen=True)
class Call:
    """Advance, then fill, then report: rows are a prepared batch (batch_id, one token each in
    `one_each`) or matchers by id (`new_tokens`, any number each)."""

    batch_id: int | None = None
    matcher_ids: tuple[int, ...] = ()
    one_each: list[int] | None = None
    new_tokens: list[list[int]] | None = None
    fill: MaskTarget | None = None
    ask_terminated: bool = False
    # A batch's tokens to wait for instead of one_each: those at `token_rows` of the landed ones.
    landed: LandedTokens | None = None
    token_rows: tuple[int, ...] = ()
    # Set SharedWords' WRITTEN word to this once the masks are written (a device's stream waits for it).
    release: int | None = None


@dataclass(frozen=True)
class Stop:
    pass


ToChild = NewMatcher | NewBatch | Forget | Call | Stop


# Messages from the child.


@dataclass(frozen=True)
class Ready:
    bitmask_words: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Answer:
    """The call's rows (by index) whose grammar rejected a token, and (if asked) whether each row's
    grammar is done."""

    rows: int
    rejected: tuple[int, ...] = ()
    terminated: tuple[bool, ...] = ()

    @property
    def accepted(self) -> list[bool]:
        accepted = [True] * self.rows
        for row in self.rejected:
            accepted[row] = False
        return accepted


@dataclass(frozen=True)
class Failed:
    message: str


FromChild = Ready | Answer | Failed


# Whether one 32-bit counter has reached a ticket, as CUDA's stream waits compare (the counter may wrap).
def reached(counter: int, ticket: int) -> bool:
    return ((counter - ticket) & 0xFFFFFFFF) < 0x80000000


class SharedWords:
    """Two 32-bit counters in shared memory between the engine and its mask process: LANDED, the ticket
    of the latest step whose tokens are in the token ring (written by the device's stream, or by the
    engine on a CPU), and WRITTEN, the ticket of the latest masks written (by the mask process; a
    device's stream waits for it). Made by the engine before the mask process, which attaches to it."""

    LANDED = 0
    WRITTEN = 1

    def __init__(self) -> None:
        self.segment = SharedMemory(create=True, size=SHARED_WORDS_BYTES)
        # Both words, as one array: a device registers them at once.
        self.words = np.ndarray((2,), dtype=np.uint32, buffer=self.segment.buf)
        self.words[:] = 0
        # When the mask process last set WRITTEN (time.perf_counter, one clock for all processes on
        # Linux): what benchmarks read to time the masks as a device would see them.
        self.written_at = np.ndarray((1,), dtype=np.float64, buffer=self.segment.buf, offset=8)
        self.written_at[0] = 0.0
        self._fence = threading.Lock()
        weakref.finalize(self, _release, self.segment)

    @property
    def name(self) -> str:
        return self.segment.name

    def publish(self, index: int, ticket: int) -> None:
        """Set a word once the writes before it (tokens, masks) are visible: taking and dropping a lock
        is a full memory barrier, which weakly ordered hosts (arm64) need."""
        with self._fence:
            pass
        self.words[index] = ticket & 0xFFFFFFFF


@dataclass(frozen=True)
class TokenLanding:
    """Where the engine puts a step's sampled token ids for the mask process: write `tokens`, then set
    LANDED to `where.ticket`. ring: the whole segment's array (a device page-locks it once)."""

    tokens: np.ndarray
    ring: np.ndarray
    where: LandedTokens


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
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=EXIT_CODE_WAIT_S)
        gone = MaskProcessError(f"the grammar mask process exited (exit code {self._process.returncode})")
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
            _release(scratch)
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
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=EXIT_CODE_WAIT_S)
            raise MaskProcessError(
                f"the grammar mask process exited (exit code {self._process.returncode})"
            ) from None
        return message

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
            _release(segment)
        self._segments.clear()
        for retired in (self._scratch, self._ring, *self._retired):
            if retired is not None:
                _release(retired)
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


def _release(segment: SharedMemory) -> None:
    # Views into it may outlive the segment's name: the memory goes with the last of them.
    with contextlib.suppress(BufferError):
        segment.close()
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()


# The child.


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
            raise MaskProcessError("landed tokens without the engine's shared words")
        spins, deadline = self._spins, 0.0
        while not reached(int(words[SharedWords.LANDED]), landed.ticket):
            if spins:
                spins -= 1
                continue
            now = time.monotonic()
            if not deadline:
                deadline = now + self._landing_timeout_s
            elif now > deadline:
                raise MaskProcessError(f"the tokens of landing {landed.ticket} never landed")
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
        self.words[SharedWords.WRITTEN] = ticket & 0xFFFFFFFF


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
