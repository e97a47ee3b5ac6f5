"""Under tensor parallelism, a constrained request's grammar compiles on every rank's background threads
before the request is scheduled: the other requests go on producing tokens meanwhile. Each rank's
compile is made to block on a cross-process event (no timing is assumed); releasing it lets the request
finish as TP=1 finishes it; an abort, a shutdown, a failing grammar and a worker dying while compiling
end cleanly."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import pytest

from batchlm import LLM, SamplingParams
from batchlm.core.engine_core import EngineCore
from batchlm.executor import core_process, tensor_parallel
from batchlm.executor.core_messages import AddRequests, Shutdown
from batchlm.executor.core_process import CoreLoop
from batchlm.executor.tensor_parallel import TensorParallelError, TensorParallelExecutor
from batchlm.outputs import CoreOutputs, FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import StructuredOutputs
from blocking_grammars import FAILING, RankCompiles, first_finish_reason

pytestmark = pytest.mark.slow

ENGINE_ARGS: dict[str, Any] = {"device": "cpu", "cpu_kv_cache_gib": 0.02, "max_num_batched_tokens": 24}
PROMPT = (1, 5, 9, 4)


class Collected:
    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, FinishReason] = {}
        self.errors: dict[str, str | None] = {}

    def add(self, outputs: CoreOutputs) -> None:
        for output in outputs:
            self.tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finish_reason is not None:
                self.finish[output.request_id] = output.finish_reason
                self.errors[output.request_id] = output.error


def _request(
    request_id: str, spec: StructuredOutputs | None, eos: tuple[int, ...], max_tokens: int = 8
) -> EngineCoreRequest:
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=spec is None, structured_outputs=spec
    )
    return EngineCoreRequest(request_id, PROMPT, params, eos, time.time())


def _finish(core: EngineCore, request_id: str, seen: Collected) -> None:
    while request_id not in seen.finish:
        seen.add(core.step())


@pytest.fixture(scope="module")
def rank_compiles() -> RankCompiles:
    return RankCompiles()


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Callable[..., Path], rank_compiles: RankCompiles) -> Iterator[tuple[LLM, LLM]]:
    """(TP=1, TP=2) engines of the tiny llama; TP=2's ranks compile regexes over a-c only once released."""
    model_dir = str(tiny_model_dir("llama"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensor_parallel, "worker_main", rank_compiles.worker_main())
        tp2 = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    yield LLM(model=model_dir, **ENGINE_ARGS), tp2
    rank_compiles.release.set()  # never leave a rank's compile blocked
    _executor(tp2).shutdown()


@pytest.fixture
def compiles(rank_compiles: RankCompiles) -> Iterator[RankCompiles]:
    rank_compiles.reset()
    yield rank_compiles
    rank_compiles.release.set()


def _executor(llm: LLM) -> TensorParallelExecutor:
    executor = llm.engine_core.executor
    assert isinstance(executor, TensorParallelExecutor)
    return executor


def test_tp_requests_decode_while_every_rank_compiles(
    engines: tuple[LLM, LLM], compiles: RankCompiles
) -> None:
    tp1, tp2 = engines
    core, eos = tp2.engine_core, tp2.tokenizer.eos_token_ids
    spec = StructuredOutputs(regex="[a-c]{2,6}")
    core.add_request(_request("constrained", spec, eos, max_tokens=12))
    core.add_request(_request("plain", None, eos, max_tokens=200))
    # Both ranks compile (and block) before any step; a step that compiled would never return.
    compiles.wait_entered(2)
    seen = Collected()
    for _ in range(12):
        seen.add(core.step())
    assert len(seen.tokens["plain"]) >= 10, "the plain request went on while the ranks compiled"
    assert "constrained" not in seen.tokens and core.stats().num_waiting == 1
    compiles.release.set()
    _finish(core, "constrained", seen)
    # The same greedy tokens as one device gives.
    expected = Collected()
    tp1.engine_core.add_request(_request("constrained", spec, eos, max_tokens=12))
    _finish(tp1.engine_core, "constrained", expected)
    assert seen.tokens["constrained"] == expected.tokens["constrained"]
    assert seen.finish["constrained"] == expected.finish["constrained"]
    text = tp2.tokenizer.decode(seen.tokens["constrained"], skip_special_tokens=True)
    assert re.fullmatch("[a-c]*", text), text
    core.abort_requests(["plain"])
    while core.has_work():
        core.step()


def test_tp_abort_while_compiling_releases_the_request(
    engines: tuple[LLM, LLM], compiles: RankCompiles
) -> None:
    _, tp2 = engines
    core, eos = tp2.engine_core, tp2.tokenizer.eos_token_ids
    spec = StructuredOutputs(regex="[a-c]{20,30}")  # longer than max_tokens: it ends by length
    core.add_request(_request("aborted", spec, eos))
    compiles.wait_entered(2)
    [aborted] = core.abort_requests(["aborted"])
    assert aborted.finish_reason is FinishReason.ABORT
    assert not core.has_work() and core.stats().num_waiting == 0
    compiles.release.set()
    # The id again, the same grammar: the ranks' reports of the aborted compile do not count for it.
    core.add_request(_request("aborted", spec, eos))
    seen = Collected()
    _finish(core, "aborted", seen)
    assert seen.finish["aborted"] is FinishReason.LENGTH, seen.errors
    text = tp2.tokenizer.decode(seen.tokens["aborted"], skip_special_tokens=True)
    assert re.fullmatch("[a-c]+", text), text
    while core.has_work():
        core.step()


def test_tp_finished_compiles_wake_an_idle_core_loop(
    engines: tuple[LLM, LLM], compiles: RankCompiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle loop waits on the ranks' news pipe, not on a poll: with the poll made endless, the
    compiles' end still wakes it."""
    monkeypatch.setattr(core_process, "IDLE_POLL_S", 24 * 3600.0)
    _, tp2 = engines
    core, eos = tp2.engine_core, tp2.tokenizer.eos_token_ids
    front, core_end = Pipe()
    loop = CoreLoop(core, core_end)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    front.send(AddRequests((_request("woken", StructuredOutputs(regex="[a-c]{3,6}"), eos),)))
    compiles.wait_entered(2)
    compiles.release.set()
    assert first_finish_reason(front) in (FinishReason.STOP, FinishReason.LENGTH)
    front.send(Shutdown())
    thread.join()


def test_tp_shutdown_while_compiling_ends_the_loop_and_the_workers(
    tiny_model_dir: Callable[..., Path], compiles: RankCompiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The core loop ends with every rank's compile still blocked, and the workers stop then too."""
    monkeypatch.setattr(tensor_parallel, "worker_main", compiles.worker_main())
    llm = LLM(model=str(tiny_model_dir("llama")), tensor_parallel_size=2, **ENGINE_ARGS)
    core, eos = llm.engine_core, llm.tokenizer.eos_token_ids
    front, core_end = Pipe()
    loop = CoreLoop(core, core_end)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    front.send(AddRequests((_request("held", StructuredOutputs(regex="[a-c]{3,7}"), eos),)))
    compiles.wait_entered(2)
    front.send(Shutdown())
    thread.join()
    loop.close()
    executor = _executor(llm)
    executor.shutdown()
    assert [process.exitcode for process in executor.processes] == [0, 0]


def test_tp_grammar_failing_on_the_ranks_ends_only_its_request(
    engines: tuple[LLM, LLM], compiles: RankCompiles
) -> None:
    _, tp2 = engines
    compiles.release.set()
    failing = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=FAILING)
    sound = SamplingParams(
        temperature=0.0, max_tokens=8, structured_outputs=StructuredOutputs(regex="[a-c]{1,4}")
    )
    plain = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    failed, good, other = tp2.generate(["x", "y", "z"], [failing, sound, plain])
    assert failed.outputs[0].finish_reason == "error" and failed.outputs[0].token_ids == []
    assert failed.error is not None and "does not compile for this tokenizer" in failed.error
    assert good.error is None and re.fullmatch("[a-c]*", good.outputs[0].text)
    assert other.error is None and len(other.outputs[0].token_ids) == 5
    assert not tp2.engine_core.has_work()


def test_tp_worker_dying_while_compiling_names_its_rank(
    engines: tuple[LLM, LLM], compiles: RankCompiles
) -> None:
    """Last: it ends the TP=2 engine. The offline step waits for the compiles; rank 1 dies meanwhile."""
    _, tp2 = engines
    executor = _executor(tp2)

    def kill_rank_1() -> None:
        compiles.wait_entered(2)
        executor.processes[1].kill()

    threading.Thread(target=kill_rank_1, daemon=True).start()
    params = SamplingParams(
        temperature=0.0, max_tokens=8, structured_outputs=StructuredOutputs(regex="[a-c]{4}")
    )
    with pytest.raises(TensorParallelError, match="rank 1"):
        tp2.generate(["abc"], params)
