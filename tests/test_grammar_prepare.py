"""The llguidance backend compiles ahead, off the engine thread: a compile under way never holds up a
matcher of a grammar already compiled, and once grammars are prepared ahead, making a matcher never
compiles (the extra templates are compiled by `prepare`)."""

from __future__ import annotations

import threading

import pytest

from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams, StructuredOutputs
from batchlm.structured import llguidance_backend
from batchlm.structured.compiles import BackgroundCompiles
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from blocking_grammars import BLOCKED, BlockingBackend, Compiles, join_compile_threads
from grammar_walk import EOS

SLOW = StructuredOutputs(regex="[a-z]{1,9}")
CACHED = StructuredOutputs(regex="[0-9]{1,9}")


def test_a_compile_under_way_does_not_hold_up_a_cached_grammar(tiny_tokenizer, monkeypatch) -> None:
    backend = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS)
    backend.matcher(CACHED)
    entered, release = threading.Event(), threading.Event()
    compile_one = backend._compile

    def blocking(spec: StructuredOutputs):  # type: ignore[no-untyped-def]
        if spec == SLOW:
            entered.set()
            release.wait()
        return compile_one(spec)

    monkeypatch.setattr(backend, "_compile", blocking)
    compiling = threading.Thread(target=backend.prepare, args=(SLOW,))
    compiling.start()
    try:
        entered.wait()
        assert backend.compiled(CACHED) and not backend.compiled(SLOW)
        # On the old backend this waited for the other compile, under the backend's lock.
        assert backend.matcher(CACHED).accept(tiny_tokenizer.encode("7")[-1])
    finally:
        release.set()
        compiling.join()
    assert backend.compiled(SLOW)
    assert backend.compiled_cache.misses == 2


def test_prepared_grammars_grow_their_templates_off_the_engine_thread(tiny_tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(llguidance_backend, "TEMPLATES_PER_THREAD", 1)
    backend = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS, threads=3)
    backend.prepare(SLOW)
    pool = backend.compiled_cache.get_or_make(SLOW.key, lambda: pytest.fail("compiled again"))
    assert len(pool.templates) == 1
    monkeypatch.setattr(pool, "_compile_one", lambda: pytest.fail("a copy compiled a template"))
    assert [backend.matcher(SLOW).family for _ in range(3)] == [0, 0, 0]
    monkeypatch.undo()
    for _ in range(4):  # two extra templates at most (threads=3), then no more
        backend.prepare(SLOW)
    assert len(pool.templates) == 3
    assert sorted(backend.matcher(SLOW).family for _ in range(3)) == [0, 1, 2]


def _request(request_id: str, spec: StructuredOutputs) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, (1, 2), SamplingParams(structured_outputs=spec), EOS, 0.0)


def test_requests_with_one_spec_wait_for_one_compile_and_are_released_together(tiny_tokenizer) -> None:
    made = Compiles()
    real = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS)
    backend = BlockingBackend(real, made.release, made.entered)
    compiles = BackgroundCompiles(lambda eos: backend, lambda: backend)
    try:
        assert not compiles.start(_request("a", BLOCKED))
        assert not compiles.start(_request("b", BLOCKED))
        made.entered.wait()
        assert not compiles.has_done()
        made.release.set()
        compiles.wait_done()
        assert compiles.take_done() == {"a": None, "b": None}
        assert backend.compiled_on == ["grammar-compile"], "one compile for both"
        assert not compiles.wakeup.poll(), "take_done drained the wakeup"
    finally:
        made.release.set()
        compiles.close()
        join_compile_threads()


def test_a_compiled_grammar_needs_no_wait_and_grows_a_template_in_the_background(
    tiny_tokenizer, monkeypatch
) -> None:
    monkeypatch.setattr(llguidance_backend, "TEMPLATES_PER_THREAD", 1)
    backend = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS, threads=3)
    compiles = BackgroundCompiles(lambda eos: backend, lambda: backend)
    assert not compiles.start(_request("first", SLOW))
    compiles.wait_done()
    assert compiles.take_done() == {"first": None}
    assert compiles.start(_request("second", SLOW)), "compiled: ready at once"
    join_compile_threads()
    assert len(backend.compiled_cache.get_or_make(SLOW.key, lambda: pytest.fail()).templates) == 2
    assert not compiles.has_done()
    compiles.close()


def test_an_abort_after_its_compile_finished_leaves_no_stale_wakeup(tiny_tokenizer) -> None:
    # The core loop waits on `wakeup` while requests only wait for their grammar: left readable with
    # no news to take (the finished request aborted before the core took it), it woke the loop at
    # once, over and over, with nothing to drain it.
    made = Compiles()
    real = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS)
    backend = BlockingBackend(real, made.release, made.entered)
    compiles = BackgroundCompiles(lambda eos: backend, lambda: backend)
    try:
        assert not compiles.start(_request("a", BLOCKED))
        made.release.set()
        compiles.wait_done()
        assert compiles.wakeup.poll()
        compiles.discard(["a"])
        assert not compiles.has_done()
        assert not compiles.wakeup.poll(), "no news, yet the wakeup is readable"
    finally:
        made.release.set()
        compiles.close()
        join_compile_threads()
