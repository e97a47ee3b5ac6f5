"""A step with constrained rows returns once its forward pass is queued; its sampling (which waits for the
grammar masks) is queued at the start of the next runner call, before that call's forward pass, or when
its output is read first. Tokens stay those of the synchronous engine."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchlm import LLM, SamplingParams
from batchlm.runner.deferred_step import DeferredStepOutput
from batchlm.runner.model_runner import ModelRunner
from batchlm.runner.step_output import PendingStepOutput
from batchlm.sampling_params import StructuredOutputs

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
    "required": ["n", "b"],
    "additionalProperties": False,
}
SPEC = StructuredOutputs(json=json.dumps(SCHEMA))
PROMPTS = ["one", "two two", "three three three", "four"]


def params() -> list[SamplingParams]:
    constrained = SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs=SPEC)
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [constrained, plain, constrained.clone(seed=4), plain]


class RunnerLog:
    """Records the runner's calls, forward passes and samplings in order."""

    def __init__(self, runner: ModelRunner) -> None:
        self.events: list[str] = []
        self.returned: list[Any] = []
        execute_async, forward, sample = runner.execute_async, runner._forward, runner._sample

        def logged_execute_async(scheduled: Any) -> Any:
            self.events.append("call")
            output = execute_async(scheduled)
            deferred = isinstance(output, DeferredStepOutput)
            self.events.append("deferred" if deferred and not output.is_sampled else "returned")
            self.returned.append(output)
            return output

        runner.execute_async = logged_execute_async  # type: ignore[method-assign]
        runner._forward = self._logged("forward", forward)  # type: ignore[method-assign]
        runner._sample = self._logged("sample", sample)  # type: ignore[method-assign]

    def _logged(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            self.events.append(name)
            return fn(*args)

        return wrapper


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


def test_deferred_output_samples_once() -> None:
    calls: list[int] = []
    ready = PendingStepOutput.ready()

    def sample() -> PendingStepOutput:
        calls.append(1)
        return ready

    deferred = DeferredStepOutput(sample, {})
    assert not deferred.is_sampled
    assert deferred.sample() is ready and deferred.sample() is ready
    assert deferred.result() is ready.result()
    assert deferred.is_sampled and len(calls) == 1


def test_constrained_steps_sample_before_the_next_forward(llama_dir: Path) -> None:
    sync = LLM(model=str(llama_dir), device="cpu")
    expected = [o.outputs[0].token_ids for o in sync.generate(PROMPTS, params())]
    llm = LLM(model=str(llama_dir), device="cpu", async_scheduling="on")
    log = RunnerLog(llm.engine_core.executor)  # type: ignore[arg-type]
    outputs = llm.generate(PROMPTS, params())
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for index in (0, 2):
        json.loads(outputs[index].outputs[0].text)
    assert log.events.count("deferred") > 10
    calls = " ".join(log.events).split("call ")
    for previous, call in itertools.pairwise(calls):
        if previous.endswith("deferred "):
            # The deferred step's sampling comes first, before this call's forward pass.
            assert call.startswith("sample"), call
    assert all(o.is_sampled for o in log.returned if isinstance(o, DeferredStepOutput))


def test_reading_a_deferred_output_samples_it(llama_dir: Path) -> None:
    """Without async scheduling each step's output is read at once: result() queues the sampling."""
    llm = LLM(model=str(llama_dir), device="cpu", async_scheduling="off")
    log = RunnerLog(llm.engine_core.executor)  # type: ignore[arg-type]
    outputs = llm.generate(PROMPTS[:1], params()[:1])
    json.loads(outputs[0].outputs[0].text)
    assert "deferred" in log.events
    assert all(o.is_sampled for o in log.returned if isinstance(o, DeferredStepOutput))
