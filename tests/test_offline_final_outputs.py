"""Offline generation (`LLM.generate`) reports a sequence without stop strings or logprobs once, when it
finishes: the core holds its tokens back instead of making an output for it every step. The tokens and
timings are those of the step-by-step path."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlm import LLM, SamplingParams
from batchlm.outputs import EngineCoreOutput

PROMPTS = [[1, 5, 9], [1, 5, 9, 5, 9, 5, 9], list(range(3, 30))]


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_each_sequence_is_reported_once_with_the_tokens_of_step_by_step_outputs(
    tiny_model_dir: Callable[..., Path], async_scheduling: str
) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", async_scheduling=async_scheduling)
    reports: collections.Counter[str] = collections.Counter()
    step = llm.engine_core.step

    def counted_step() -> list[EngineCoreOutput]:
        outputs = step()
        reports.update(output.request_id for output in outputs)
        return outputs

    llm.engine_core.step = counted_step  # type: ignore[method-assign]
    final = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, n=2, ignore_eos=True))
    assert len(reports) == 2 * len(PROMPTS) and set(reports.values()) == {1}
    reports.clear()
    # Logprobs need every step's output: the same greedy tokens, reported token by token.
    step_by_step = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=12, n=2, logprobs=0, ignore_eos=True)
    )
    assert set(reports.values()) == {12}
    for held, streamed in zip(final, step_by_step, strict=True):
        assert [c.token_ids for c in held.outputs] == [c.token_ids for c in streamed.outputs]
        assert [c.text for c in held.outputs] == [c.text for c in streamed.outputs]
        metrics = held.metrics
        assert metrics is not None and metrics.first_token_time is not None
        assert metrics.first_scheduled_time is not None and metrics.last_token_time is not None
        assert metrics.arrival_time <= metrics.first_scheduled_time <= metrics.first_token_time
        assert metrics.first_token_time < metrics.last_token_time
