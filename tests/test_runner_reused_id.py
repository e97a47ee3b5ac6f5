"""A request whose id is that of one which ended in the step before (the engine core allows it once the
first has finished) runs as a fresh request, even when the step that drops the first one's state also
starts it and a constrained step's sampling was deferred past it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlm import LLM, SamplingParams
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import StructuredOutputs

PROMPT = (1, 5, 9, 4, 7, 7, 2, 9, 11, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
PLAIN = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_an_id_reused_in_the_step_that_drops_it(tiny_model_dir: Callable[..., Path], scheduling: str) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", async_scheduling=scheduling)
    core, eos = llm.engine_core, llm.tokenizer.eos_token_ids
    assert core is not None
    core.add_request(EngineCoreRequest("alone", PROMPT, PLAIN, eos, time.time()))
    expected = [
        token for _ in iter(core.has_work, False) for out in core.step() for token in out.new_token_ids
    ]
    assert len(expected) == 12

    # Constrained, so that its last step's sampling waits for masks (deferred to the next step).
    constrained = SamplingParams(
        temperature=0.0, max_tokens=3, structured_outputs=StructuredOutputs(regex="[a-c]{5,9}")
    )
    core.add_request(EngineCoreRequest("same", (1, 5, 9, 4), constrained, eos, time.time()))
    tokens: list[int] = []
    reused = False
    while core.has_work():
        for out in core.step():
            if reused:
                tokens += out.new_token_ids
            elif out.finish_reason is not None:
                # Before the next step, which drops the first one's state in the runner.
                core.add_request(EngineCoreRequest("same", PROMPT, PLAIN, eos, time.time()))
                reused = True
    assert tokens == expected
