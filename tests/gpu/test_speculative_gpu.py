"""Speculative decoding on CUDA (verify chunks run eagerly beside the CUDA-graph decodes, with and
without async scheduling): the same tokens as without speculation, drafts accepted, no block held."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

# Random tiny models fall into cycles under greedy decoding; this prompt's output is copied a lot.
LOOPING = [5, 6, 7, 8, 9] * 6


def _tokens(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[Any]:
    outputs = llm.generate(prompts, params)
    scheduler = llm.engine_core.scheduler
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    return [[(c.token_ids, c.finish_reason) for c in output.outputs] for output in outputs]


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Callable[..., Path]) -> dict[str, LLM]:
    model_dir = tiny_model_dir("llama")
    # A fixed KV cache: a second engine would otherwise count the first one's memory as taken.
    return {
        f"{speculative}-{scheduling}": LLM(
            model=str(model_dir),
            device="cuda",
            dtype="float32",
            speculative=speculative,
            async_scheduling=scheduling,
            num_gpu_blocks_override=256,
        )
        for speculative in ("off", "ngram")
        for scheduling in ("off", "on")
    }


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_same_tokens_with_speculation(engines: dict[str, LLM], scheduling: str) -> None:
    prompts = [LOOPING, LOOPING[:17], list(range(40, 80)), [11, 12, 13]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=80, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=4, max_tokens=60, ignore_eos=True, n=2),
    ]
    spec = engines[f"ngram-{scheduling}"]
    before = spec.engine_core.scheduler.stats().spec_accepted_tokens_total
    assert _tokens(spec, prompts, params) == _tokens(engines[f"off-{scheduling}"], prompts, params)
    assert spec.engine_core.scheduler.stats().spec_accepted_tokens_total > before
    assert spec.engine_core.async_scheduling == (scheduling == "on")


def test_single_request_decodes_in_fewer_steps(engines: dict[str, LLM]) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)]
    spec, plain = engines["ngram-off"], engines["off-off"]
    steps = {}
    for name, llm in (("spec", spec), ("plain", plain)):
        start = llm.engine_core.num_steps
        tokens = _tokens(llm, [LOOPING], params)
        steps[name] = (llm.engine_core.num_steps - start, tokens)
    assert steps["spec"][1] == steps["plain"][1]
    assert steps["spec"][0] < steps["plain"][0]
