"""A grammar backend whose compile of one spec blocks until released, and another spec that does not
compile: for tests of the compiles done off the engine thread (no timing assumed)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarBackend, GrammarError, GrammarMatcher, MatcherBatch
from batchlm.structured.factory import BackendFactory

# Seconds a test waits for a compile that should start at once: never reached when it works (a bound
# on a hang, not a timing).
HANG_GUARD_S = 300.0

BLOCKED = StructuredOutputs(regex="[a-c]{2,6}")
FAILING = StructuredOutputs(regex="[x-z]{2,6}")


class BlockingBackend:
    """The real backend, but compiling BLOCKED waits for `release` (noting `entered` first), and
    FAILING does not compile."""

    def __init__(self, real: GrammarBackend, release: threading.Event, entered: threading.Event) -> None:
        self.real = real
        self.release = release
        self.entered = entered
        self.bitmask_words = real.bitmask_words
        self.eos_token_ids = real.eos_token_ids
        self.compiled_on: list[str] = []

    def matcher(self, spec: StructuredOutputs) -> GrammarMatcher:
        self.compiled_on.append(threading.current_thread().name)
        if spec == BLOCKED:
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
