"""Constrained requests arriving every few steps and ending at different lengths, as a server sees
them, driven through an engine core step by step (the CPU and GPU tests of masks handed to the
device share it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from batchlm import LLM, SamplingParams
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import StructuredOutputs

REQUESTS = 8
EVERY_STEPS = 3


@dataclass
class Served:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, str] = field(default_factory=dict)
    steps: int = 0


def serve_staggered(llm: LLM, spec: StructuredOutputs, max_steps: int = 400) -> Served:
    """Eight requests, one every three steps, each longer than the one before; steps until all finish."""
    core, eos = llm.engine_core, llm.tokenizer.eos_token_ids
    served = Served()
    arrivals_end = REQUESTS * EVERY_STEPS
    while served.steps < max_steps and (served.steps < arrivals_end or core.has_work()):
        if served.steps % EVERY_STEPS == 0 and served.steps < arrivals_end:
            index = served.steps // EVERY_STEPS
            params = SamplingParams(
                temperature=1.0, seed=index, max_tokens=25 + 9 * index, structured_outputs=spec
            )
            prompt = tuple(range(5, 9 + index))
            core.add_request(EngineCoreRequest(f"r{index}", prompt, params, eos, time.time()))
            served.tokens[f"r{index}"] = []
        for output in core.step():
            served.tokens[output.request_id].extend(output.new_token_ids)
            if output.finish_reason is not None:
                served.finish_reasons[output.request_id] = output.finish_reason.value
        served.steps += 1
    return served
