"""A grammar backend whose compile of one spec blocks until released, and another spec that does not
compile: for tests of the compiles done off the engine thread (no timing assumed)."""

from __future__ import annotations

import functools
import multiprocessing
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarBackend, GrammarError, GrammarMatcher, MatcherBatch
from batchlm.structured.factory import BackendFactory

# Seconds a test waits for a compile that should start at once: never reached when it works (a bound
# on a hang, not a timing).
HANG_GUARD_S = 300.0

BLOCKED = StructuredOutputs(regex="[a-c]{2,6}")
FAILING = StructuredOutputs(regex="[x-z]{2,6}")


class Gate(Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...

    def set(self) -> None: ...


class BlockingBackend:
    """The real backend, but compiling BLOCKED (or a spec `blocks` names) waits for `release` (noting
    `entered` first), and FAILING does not compile."""

    def __init__(
        self,
        real: GrammarBackend,
        release: Gate,
        entered: Gate,
        blocks: Callable[[StructuredOutputs], bool] = BLOCKED.__eq__,
    ) -> None:
        self.real = real
        self.release = release
        self.entered = entered
        self.blocks = blocks
        self.bitmask_words = real.bitmask_words
        self.eos_token_ids = real.eos_token_ids
        self.compiled_on: list[str] = []

    def matcher(self, spec: StructuredOutputs) -> GrammarMatcher:
        self.compiled_on.append(threading.current_thread().name)
        if self.blocks(spec):
            self.entered.set()
            self.release.wait()
        if spec == FAILING:
            raise GrammarError("the regex does not compile for this tokenizer")
        return self.real.matcher(spec)

    def batch(self, matchers: list[GrammarMatcher]) -> MatcherBatch:
        return self.real.batch(matchers)

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask: np.ndarray) -> None:
        self.real.fill_bitmasks(matchers, bitmask)

    def advance(self, matchers: list[GrammarMatcher], new_tokens: list[list[int]]) -> list[bool]:
        return self.real.advance(matchers, new_tokens)

    def advance_and_fill(
        self, matchers: list[GrammarMatcher], new_tokens: list[list[int]], bitmask: np.ndarray
    ) -> list[bool]:
        return self.real.advance_and_fill(matchers, new_tokens, bitmask)


class Compiles:
    """The events a BlockingBackend waits on and sets, and the backends made."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.backends: list[BlockingBackend] = []

    def factory(self, real: Callable[..., BackendFactory]) -> Callable[..., BackendFactory]:
        def make_factory(*args: object, **kwargs: object) -> BackendFactory:
            make_real = real(*args, **kwargs)

            def make(eos_token_ids: tuple[int, ...]) -> GrammarBackend:
                backend = BlockingBackend(make_real(eos_token_ids), self.release, self.entered)
                self.backends.append(backend)
                return backend

            return make

        return make_factory


def join_compile_threads() -> None:
    """Wait for the compile threads to end (each ends once its queue is empty; the blocking compile
    must have been released)."""
    for thread in threading.enumerate():
        if thread.name == "grammar-compile":
            thread.join()


def blocks_a_to_c(spec: StructuredOutputs) -> bool:
    """Every regex over a-c blocks: a test per spec, each compiled (and blocked) afresh."""
    return spec.regex is not None and spec.regex.startswith("[a-c]")


class _Entered:
    """Counts the compiles that began blocking (one per rank), across processes."""

    def __init__(self, entries: Any) -> None:
        self.entries = entries

    def wait(self, timeout: float | None = None) -> bool:
        raise NotImplementedError

    def set(self) -> None:
        self.entries.release()


class OpenGate:
    """An event across processes on a semaphore: unlike multiprocessing.Event, setting it never waits
    for a waiter that was killed while it waited (a test kills a rank blocked on it)."""

    def __init__(self, opened: Any) -> None:
        self.opened = opened

    def wait(self, timeout: float | None = None) -> bool:
        if not self.opened.acquire(timeout=timeout):
            return False
        self.opened.release()  # open for the next waiter too
        return True

    def set(self) -> None:
        self.opened.release()

    def clear(self) -> None:
        while self.opened.acquire(block=False):
            pass


class RankCompiles:
    """Blocking compiles in tensor-parallel worker processes: `worker_main` stands in for the workers'
    entry point (before they are spawned), so that each rank's grammar backend blocks on regexes over
    a-c until `release` is set."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.release = OpenGate(context.Semaphore(0))
        self.entries = context.Semaphore(0)

    def worker_main(self) -> Callable[..., None]:
        return functools.partial(blocking_worker_main, self.release, self.entries)

    def reset(self) -> None:
        """Close the gate and forget the compiles entered so far (each matcher made of a blocking spec
        counts, the runner's after the compile's too)."""
        self.release.clear()
        while self.entries.acquire(block=False):
            pass

    def wait_entered(self, ranks: int) -> None:
        """Until every rank's compile is blocked."""
        for _ in range(ranks):
            assert self.entries.acquire(timeout=HANG_GUARD_S), "a rank never started compiling"


def blocking_worker_main(release: Any, entries: Any, *args: Any) -> None:
    """A worker process's entry point, its grammar backend a BlockingBackend."""
    from batchlm.executor.worker import worker_main
    from batchlm.runner import grammar as runner_grammar

    real_factory = runner_grammar.backend_factory

    def make_factory(*factory_args: Any, **kwargs: Any) -> BackendFactory:
        make_real = real_factory(*factory_args, **kwargs)
        return lambda eos: BlockingBackend(make_real(eos), release, _Entered(entries), blocks_a_to_c)

    runner_grammar.backend_factory = make_factory  # type: ignore[assignment]
    worker_main(*args)


def first_finish_reason(front: Any) -> Any:
    """Read a core loop's StepOutputs from `front` until one of its outputs finishes; its reason."""
    from batchlm.executor.core_messages import StepOutputs

    while True:
        message = front.recv()
        assert isinstance(message, StepOutputs)
        finish = next((o.finish_reason for o in message.outputs if o.finish_reason is not None), None)
        if finish is not None:
            return finish
