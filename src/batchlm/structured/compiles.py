"""Grammars compiled on background threads before their requests are scheduled (the engine core's
GrammarCompiles). A compile fills the backend's cache of compiled grammars, so that the runner's
`matcher(spec)` in the step that admits the request is a copy. Compiling a large JSON schema takes
seconds; done inside a step it held every running stream for that long."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Protocol, runtime_checkable

from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarBackend, GrammarError, grammar_failure_error

logger = logging.getLogger(__name__)

# Compiles at once: a few, so that one huge schema does not hold up the small ones behind it, and few
# enough to leave the cores to the model. llguidance releases the GIL while it compiles.
COMPILE_THREADS = 2


@runtime_checkable
class PreparingBackend(Protocol):
    """A backend that can compile a spec into its cache without making a matcher, and say whether it
    has (LLGuidanceBackend). Other backends are prepared by making a matcher, which caches too."""

    def compiled(self, spec: StructuredOutputs) -> bool: ...

    def can_grow(self, spec: StructuredOutputs) -> bool: ...

    def prepare(self, spec: StructuredOutputs) -> None: ...


@dataclass(eq=False)  # compared by identity: two jobs of one spec are still two jobs
class _Job:
    key: Hashable
    spec: StructuredOutputs
    eos_token_ids: tuple[int, ...]
    # The requests waiting for it (none: it only adds a template to a compiled grammar).
    waiting: list[str] = field(default_factory=list)


class BackgroundCompiles:
    """GrammarCompiles on up to `threads` daemon threads, started when there is work and ended when
    there is none (no thread outlives its work, nor keeps the engine alive). Requests with the same
    spec wait for one compile, and are released together."""

    def __init__(
        self,
        backend_for: Callable[[tuple[int, ...]], GrammarBackend],
        built: Callable[[], GrammarBackend | None],
        threads: int = COMPILE_THREADS,
        notify: Callable[[], None] | None = None,
    ) -> None:
        """backend_for: the backend for the engine's EOS ids, built on first call (on a compile
        thread, so loading the tokenizer does not stall a step either); built: it, if built already;
        notify: called on a compile thread once take_done has news (a wake-up for a loop that waits on
        a queue rather than on `wakeup`)."""
        self._backend_for = backend_for
        self._built = built
        self._notify = notify
        self._max_threads = max(1, threads)
        self._lock = threading.Lock()
        self._finished = threading.Condition(self._lock)
        self._queue: deque[_Job] = deque()
        # Spec key -> its job, queued or running, while requests wait for it.
        self._jobs: dict[Hashable, _Job] = {}
        self._job_of: dict[str, _Job] = {}
        self._growing: set[Hashable] = set()
        self._done: dict[str, str | None] = {}
        self._threads = 0
        self._closed = False
        self._reader, self._writer = multiprocessing.Pipe(duplex=False)

    @property
    def wakeup(self) -> Connection:
        return self._reader

    def start(self, request: EngineCoreRequest) -> bool:
        spec = request.sampling_params.structured_outputs
        assert spec is not None, "only a constrained request has a grammar to compile"
        return self.start_spec(request.request_id, spec, tuple(request.eos_token_ids))

    def start_spec(self, request_id: str, spec: StructuredOutputs, eos_token_ids: tuple[int, ...]) -> bool:
        """start, given only what the compile needs (a tensor-parallel rank gets no whole request)."""
        key = spec.key
        with self._lock:
            if self._closed:
                raise RuntimeError("grammar compiles were closed")
            job = self._jobs.get(key)
            backend = self._built()
            if job is None and isinstance(backend, PreparingBackend) and backend.compiled(spec):
                if key not in self._growing and backend.can_grow(spec):
                    # One more template of the grammar, for the mask threads (the request need not wait).
                    self._growing.add(key)
                    self._enqueue(_Job(key, spec, eos_token_ids))
                return True
            if job is None:
                job = self._jobs[key] = _Job(key, spec, eos_token_ids)
                self._enqueue(job)
            job.waiting.append(request_id)
            self._job_of[request_id] = job
            return False

    def _enqueue(self, job: _Job) -> None:
        self._queue.append(job)
        if self._threads < self._max_threads:
            self._threads += 1
            threading.Thread(target=self._run, name="grammar-compile", daemon=True).start()

    def has_done(self) -> bool:
        return bool(self._done)

    def take_done(self) -> dict[str, str | None]:
        with self._lock:
            done, self._done = self._done, {}
            self._drain_wakeup()
        return done

    def wait_done(self) -> None:
        with self._finished:
            while not self._done and self._job_of and not self._closed:
                self._finished.wait()

    def discard(self, request_ids: Iterable[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._done.pop(request_id, None)
                job = self._job_of.pop(request_id, None)
                if job is None:
                    continue
                job.waiting.remove(request_id)
                if not job.waiting and job in self._queue:  # not started: nobody needs it now
                    self._queue.remove(job)
                    del self._jobs[job.key]
            if not self._done:
                # Its news were all of requests discarded now: a readable wakeup with nothing to take
                # would wake a waiting loop at once, again and again.
                self._drain_wakeup()

    def _drain_wakeup(self) -> None:
        """Under the lock: make `wakeup` unreadable (it is readable only while _done has news)."""
        while not self._closed and self._reader.poll():
            self._reader.recv_bytes()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._jobs.clear()
            self._job_of.clear()
            self._done.clear()
            self._finished.notify_all()
            self._reader.close()
            self._writer.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._queue:
                    self._threads -= 1
                    return
                job = self._queue.popleft()
            error = self._compile(job)
            with self._lock:
                news = self._finish(job, error)
            if news and self._notify is not None:
                self._notify()

    def _compile(self, job: _Job) -> str | None:
        """None, or the error that ends the job's requests."""
        try:
            backend = self._backend_for(job.eos_token_ids)
            if isinstance(backend, PreparingBackend):
                backend.prepare(job.spec)
            else:
                backend.matcher(job.spec)
        except GrammarError as exc:
            # The API edge compiles every spec first: this is a grammar only this tokenizer rejects.
            return grammar_failure_error(str(exc))
        except Exception as exc:  # a failure of one grammar (or of the backend) ends its requests only
            logger.exception("compiling a grammar failed")
            return f"the grammar of its structured output could not be compiled: {type(exc).__name__}: {exc}"
        return None

    def _finish(self, job: _Job, error: str | None) -> bool:
        """Under the lock: release the job's requests (unless closed since); whether any were."""
        if not job.waiting:
            self._growing.discard(job.key)
        if self._closed or self._jobs.get(job.key) is not job:
            return False
        del self._jobs[job.key]
        if error is not None:
            logger.warning("requests %s: their grammar failed to compile (%s)", job.waiting, error)
        had_news = bool(self._done)
        for request_id in job.waiting:
            del self._job_of[request_id]
            self._done[request_id] = error
        if self._done and not had_news:
            self._writer.send_bytes(b"")
        self._finished.notify_all()
        return bool(job.waiting)
