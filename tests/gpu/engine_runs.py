"""What the GPU engine tests share: the sync/async engine pair they compare, the tokens a batch
generates, and traffic of random requests arriving one a step."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from batchlm import LLM, SamplingParams
from batchlm.request import EngineCoreRequest


def sync_and_async_engines(model_dir: Path) -> dict[str, LLM]:
    """The model in float32 with async scheduling "off" and "on"."""
    return {
        # A fixed KV cache: the second engine would otherwise count the first one's memory as taken.
        mode: LLM(
            model=str(model_dir),
            device="cuda",
            dtype="float32",
            async_scheduling=mode,
            num_gpu_blocks_override=256,
        )
        for mode in ("off", "on")
    }


def generated_tokens(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[Any]:
    """Each request's (token ids, finish reason) of every choice, once no KV block is held any more."""
    outputs = llm.generate(prompts, params)
    scheduler = llm.engine_core.scheduler
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    return [[(c.token_ids, c.finish_reason) for c in output.outputs] for output in outputs]


def one_arrival_a_step(llm: LLM, count: int, max_tokens_below: int, seed: int) -> None:
    """`count` requests of random prompts (up to 1,199 tokens) and lengths, one added before each step,
    then steps until all finish: every step mixes a prefill chunk with decodes of growing contexts, so
    batch sizes, block-table widths and prefill offsets take many values, as under live traffic."""
    core, rng = llm.engine_core, random.Random(seed)
    for index in range(count):
        prompt = tuple(rng.randrange(10, 300) for _ in range(rng.randrange(1, 1200)))
        params = SamplingParams(
            temperature=1.0, max_tokens=rng.randrange(8, max_tokens_below), ignore_eos=True
        )
        core.add_request(
            EngineCoreRequest(str(index), prompt, params, eos_token_ids=(2,), arrival_time=time.time())
        )
        core.step()
    while core.has_work():
        core.step()
