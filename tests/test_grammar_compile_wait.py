"""A constrained request's grammar is compiled off the engine thread, the request held back until it is
ready: the other requests go on producing tokens meanwhile. The compile is made to block on an event
(no timing is assumed): the engine steps while it blocks, then finishes the constrained request once it
is released; an abort or a shutdown while compiling ends cleanly; a grammar that fails in the engine
ends its own request only."""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from multiprocessing import Pipe
from pathlib import Path

import pytest

from batchlm import LLM, SamplingParams
from batchlm.executor import core_process
from batchlm.executor.core_messages import AddRequests, Shutdown, StepOutputs
from batchlm.executor.core_process import CoreLoop
from batchlm.outputs import CoreOutputs, FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.runner import grammar as runner_grammar
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from blocking_grammars import (
    BLOCKED,
    FAILING,
    HANG_GUARD_S,
    Compiles,
    first_finish_reason,
    join_compile_threads,
)


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[Compiles]:
    made = Compiles()
    monkeypatch.setattr(runner_grammar, "backend_factory", made.factory(runner_grammar.backend_factory))
    yield made
    made.release.set()  # never leave a compile thread blocked
    join_compile_threads()


def _engine(model_dir: Path, **kwargs: object) -> LLM:
    return LLM(model=str(model_dir), device="cpu", **kwargs)


def _request(
    request_id: str, max_tokens: int, spec: StructuredOutputs | None, eos: tuple[int, ...]
) -> EngineCoreRequest:
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=spec is None, structured_outputs=spec
    )
    return EngineCoreRequest(request_id, (1, 5, 9, 4), params, eos, time.time())


class Collected:
    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.finish: dict[str, FinishReason] = {}
        self.errors: dict[str, str | None] = {}

    def add(self, outputs: CoreOutputs) -> None:
        for output in outputs:
            self.tokens[output.request_id] += output.new_token_ids
            if output.finish_reason is not None:
                self.finish[output.request_id] = output.finish_reason
                self.errors[output.request_id] = output.error


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_other_requests_decode_while_a_grammar_compiles(
    llama_dir: Path, compiles: Compiles, scheduling: str
) -> None:
    llm = _engine(llama_dir, async_scheduling=scheduling)
    core, eos = llm.engine_core, llm.tokenizer.eos_token_ids
    runner = core.executor
    core.add_request(_request("constrained", 12, BLOCKED, eos))
    core.add_request(_request("plain", 200, None, eos))
    # The compile is under way (and blocked) before any step. The bound only turns a compile that never
    # starts off the engine thread (it would start inside a step) into a failure instead of a hang.
    assert compiles.entered.wait(HANG_GUARD_S), "no compile started before the engine stepped"
    seen = Collected()
    for _ in range(12):
        seen.add(core.step())
    assert len(seen.tokens["plain"]) >= 10, "the plain request went on while the grammar compiled"
    assert "constrained" not in seen.tokens and "constrained" not in runner.grammars  # type: ignore[attr-defined]
    assert core.stats().num_waiting == 1
    assert all(name == "grammar-compile" for name in compiles.backends[0].compiled_on)
    compiles.release.set()
    while "constrained" not in seen.finish:
        seen.add(core.step())
    text = llm.tokenizer.decode(seen.tokens["constrained"], skip_special_tokens=True)
    assert seen.finish["constrained"] in (FinishReason.STOP, FinishReason.LENGTH)
    assert re.fullmatch("[a-c]{2,6}", text) or (seen.finish["constrained"] is FinishReason.LENGTH)
    assert re.fullmatch("[a-c]*", text), text
    # The runner's matcher is a copy of the grammar the thread compiled: it was compiled once.
    real = compiles.backends[0].real
    assert isinstance(real, LLGuidanceBackend) and real.compiled_cache.misses == 1
    core.abort_requests(["plain"])
    while core.has_work():
        core.step()


def test_a_request_alone_waits_for_its_grammar_then_finishes(llama_dir: Path, compiles: Compiles) -> None:
    """Offline generation with nothing else to run: the step waits for the compile (released here from
    another thread once it is under way)."""
    llm = _engine(llama_dir)
    threading.Thread(target=lambda: compiles.entered.wait() and compiles.release.set(), daemon=True).start()
    [output] = llm.generate(
        ["abc"], SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=BLOCKED)
    )
    assert re.fullmatch("[a-c]*", output.outputs[0].text)
    assert output.outputs[0].finish_reason in ("stop", "length")


def test_an_abort_while_compiling_releases_the_request(llama_dir: Path, compiles: Compiles) -> None:
    llm = _engine(llama_dir)
    core, eos = llm.engine_core, llm.tokenizer.eos_token_ids
    core.add_request(_request("constrained", 8, BLOCKED, eos))
    compiles.entered.wait()
    [aborted] = core.abort_requests(["constrained"])
    assert aborted.finish_reason is FinishReason.ABORT
    assert not core.has_work() and core.stats().num_waiting == 0
    compiles.release.set()
    join_compile_threads()
    assert core.grammars is not None and not core.grammars.has_done()
    assert not core.has_work()
    # The grammar it compiled serves the next request with that spec at once.
    core.add_request(_request("again", 8, BLOCKED, eos))
    seen = Collected()
    while core.has_work():
        seen.add(core.step())
    assert seen.finish["again"] in (FinishReason.STOP, FinishReason.LENGTH)


def test_a_shutdown_while_compiling_ends_the_core_loop(llama_dir: Path, compiles: Compiles) -> None:
    llm = _engine(llama_dir)
    core, eos = llm.engine_core, llm.tokenizer.eos_token_ids
    front, core_end = Pipe()
    loop = CoreLoop(core, core_end)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    front.send(AddRequests((_request("constrained", 8, BLOCKED, eos), _request("plain", 6, None, eos))))
    plain_tokens: list[int] = []
    while len(plain_tokens) < 6:  # the plain request runs to its end, the grammar unready
        message = front.recv()
        assert isinstance(message, StepOutputs)
        for output in message.outputs:
            assert output.request_id == "plain"
            plain_tokens += output.new_token_ids
    assert compiles.entered.wait(HANG_GUARD_S)  # the compile may start after the plain request ends
    front.send(Shutdown())
    thread.join()  # the loop ends with the compile still blocked
    loop.close()
    compiles.release.set()
    join_compile_threads()
    assert core.grammars is not None and not core.grammars.has_done()


def test_a_finished_compile_wakes_an_idle_core_loop(
    llama_dir: Path, compiles: Compiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle loop waits on the compiles' wakeup pipe, not on a poll: with the poll made endless, the
    compile's end still wakes it."""
    monkeypatch.setattr(core_process, "IDLE_POLL_S", 24 * 3600.0)
    llm = _engine(llama_dir)
    core, eos = llm.engine_core, llm.tokenizer.eos_token_ids
    front, core_end = Pipe()
    loop = CoreLoop(core, core_end)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    front.send(AddRequests((_request("constrained", 8, BLOCKED, eos),)))
    compiles.entered.wait()
    compiles.release.set()
    assert first_finish_reason(front) in (FinishReason.STOP, FinishReason.LENGTH)
    front.send(Shutdown())
    thread.join()
    loop.close()


def test_a_grammar_failing_in_the_engine_ends_only_its_request(llama_dir: Path, compiles: Compiles) -> None:
    llm = _engine(llama_dir)
    compiles.release.set()
    failing = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=FAILING)
    sound = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=BLOCKED)
    plain = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    failed, good, other = llm.generate(["x", "y", "z"], [failing, sound, plain])
    assert failed.outputs[0].finish_reason == "error" and failed.outputs[0].token_ids == []
    assert failed.error is not None and "does not compile for this tokenizer" in failed.error
    assert good.error is None and re.fullmatch("[a-c]*", good.outputs[0].text)
    assert other.error is None and len(other.outputs[0].token_ids) == 5
    assert llm.engine_core.stats().num_running == 0 and not llm.engine_core.has_work()
