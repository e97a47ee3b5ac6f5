"""`LLM.generate` as a notebook drives it: Ctrl-C in the middle of a call, an error inside an engine
step, and calls from two threads at once. The engine stays usable: nothing of the cut-short call keeps
running, and the next call's outputs are what they would have been."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchlm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
PROMPTS = [[1, 5, 9], [1, 2, 3, 4, 5, 6]]


def token_ids(outputs: list[Any]) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


def on_third_step(llm: LLM, action: Callable[[], None]) -> None:
    """Run `action` inside the engine's third step, while the model runs."""
    executor: Any = llm.engine_core.executor
    name = "execute_async" if llm.engine_core.async_scheduling else "execute"
    launch = getattr(executor, name)
    calls = 0

    def patched(scheduled: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            action()
        return launch(scheduled)

    setattr(executor, name, patched)


def assert_idle(llm: LLM) -> None:
    scheduler = llm.engine_core.scheduler
    assert not scheduler.has_unfinished_requests()
    assert scheduler.stats().kv_cache_usage == 0


def send_ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def raise_ctrl_c() -> None:
    raise KeyboardInterrupt  # what a second Ctrl-C in the same step does


def fail() -> None:
    raise RuntimeError("device error")


@pytest.fixture
def python_sigint_handler() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a script or a notebook, whatever the test runner set."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_sigint_handler")
@pytest.mark.parametrize("async_scheduling", ["off", "on"])
@pytest.mark.parametrize(
    ("action", "error"),
    [(send_ctrl_c, KeyboardInterrupt), (raise_ctrl_c, KeyboardInterrupt), (fail, RuntimeError)],
    ids=["ctrl-c", "ctrl-c-twice", "error"],
)
def test_a_call_cut_short_in_a_step_leaves_the_engine_idle_and_correct(
    tiny_model_dir: Callable[..., Path],
    async_scheduling: str,
    action: Callable[[], None],
    error: type[BaseException],
) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", async_scheduling=async_scheduling)
    expected = token_ids(llm.generate(PROMPTS, GREEDY))
    executor: Any = llm.engine_core.executor
    on_third_step(llm, action)
    with pytest.raises(error) as raised:
        llm.chat([{"role": "user", "content": "hi"}], LONG)
    if action is send_ctrl_c:  # one Ctrl-C waits for the step to end
        assert raised.traceback[-1].name == "raise_pending"
    assert_idle(llm)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    executor.__dict__.pop("execute", None), executor.__dict__.pop("execute_async", None)
    for _ in range(2):
        outputs = llm.generate(PROMPTS, GREEDY)
        assert token_ids(outputs) == expected
        assert [output.outputs[0].finish_reason for output in outputs] == ["length", "length"]
    assert_idle(llm)


def test_ctrl_c_between_steps_aborts_the_call(tiny_model_dir: Callable[..., Path]) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu")
    expected = token_ids(llm.generate(PROMPTS, GREEDY))
    process = llm.engine_core.scheduler.update_from_output
    calls = 0

    def interrupted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        outputs = process(*args)
        if calls == 3:
            raise KeyboardInterrupt
        return outputs

    llm.engine_core.scheduler.update_from_output = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[7, 8, 9]] * 3, LONG)
    del llm.engine_core.scheduler.update_from_output
    assert_idle(llm)
    steps = llm.engine_core.num_steps
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == expected
    # Only this call's steps: the interrupted prompts' 200 tokens were not generated meanwhile.
    assert llm.engine_core.num_steps - steps <= GREEDY.max_tokens + 1


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_calls_from_two_threads_each_get_their_own_outputs(
    tiny_model_dir: Callable[..., Path], async_scheduling: str
) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", async_scheduling=async_scheduling)
    batches = [[[1, 5, 9]] * 3, [[1, 2, 3, 4, 5, 6]] * 4]
    expected = [token_ids(llm.generate(batch, GREEDY)) for batch in batches]
    results: dict[int, Any] = {}
    start = threading.Barrier(len(batches))

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = token_ids(llm.generate(batches[index], GREEDY, use_tqdm=False))
        except Exception as error:  # reported by the assertion below
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[index] for index in range(len(batches))] == expected
    assert_idle(llm)


def test_a_call_from_inside_a_call_is_refused(tiny_model_dir: Callable[..., Path]) -> None:
    """A progress-bar callable that generates would otherwise wait for itself forever."""
    from tqdm import tqdm

    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu")

    def nested_bar(*args: Any, **kwargs: Any) -> tqdm:
        llm.generate(PROMPTS, GREEDY)
        return tqdm(*args, **kwargs)

    with pytest.raises(RuntimeError, match="from inside a call in progress"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=nested_bar)
    assert_idle(llm)
    assert len(llm.generate(PROMPTS, GREEDY)) == 2
