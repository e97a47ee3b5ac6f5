"""The whole CPU engine with async scheduling on against off: the same greedy and seeded tokens for
mixed batches with stops, max_tokens, aborts mid-flight, preemption, prefix hits, n > 1, penalties
and logprobs, and no KV block held at the end."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.core.engine_core import EngineCore
from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.outputs import EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest
from scheduler_harness import assert_all_blocks_free


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Callable[..., Path]) -> LLM:
    """One CPU engine for every test below: each test gives it fresh engine cores (scheduler + the same
    model runner) with the scheduler limits it needs, so the model is loaded once."""
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", async_scheduling="off")
    _BASE_CONFIG[id(llm)] = llm.engine_core.scheduler.config
    return llm


_BASE_CONFIG: dict[int, SchedulerConfig] = {}


def _use_core(llm: LLM, mode: str, **limits: Any) -> EngineCore:
    """Point `llm` at a new engine core over its runner, async scheduling on or off, with scheduler limits
    (max_num_seqs, max_num_batched_tokens, num_blocks, enable_prefix_caching) changed from the defaults."""
    old = llm.engine_core
    assert not old.has_work()
    config = dataclasses.replace(_BASE_CONFIG[id(llm)], **limits)
    llm.engine_core = EngineCore(Scheduler(config), old.executor, async_scheduling=mode == "on")
    return llm.engine_core


def _enginevaried_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(10, 300, (n,), generator=generator).tolist() for n in (5, 17, 33, 9, 48, 1, 20)]


def _run(llm: LLM, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Any]:
    outputs = llm.generate(list(prompts), list(params))
    assert_all_blocks_free(llm.engine_core.scheduler)
    return [
        [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in output.outputs]
        for output in outputs
    ]


def _mixed_params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=16, min_tokens=4, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11, max_tokens=14, n=2),
        SamplingParams(
            temperature=0.0, max_tokens=10, repetition_penalty=1.4, frequency_penalty=0.3, logprobs=2
        ),
        SamplingParams(temperature=0.7, seed=5, max_tokens=9, presence_penalty=0.6, logit_bias={42: 3.0}),
    ]


def _stop_token(llm: LLM) -> int:
    """A token that the greedy third request really produces early on, so the stop fires mid-batch."""
    [output] = llm.generate(
        [_enginevaried_prompts()[2]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    )
    return output.outputs[0].token_ids[3]


def _same_outputs(off: list[Any], on: list[Any]) -> None:
    assert len(off) == len(on)
    for sync_request, async_request in zip(off, on, strict=True):
        for (ids, finish, stop, logprobs), (ids2, finish2, stop2, logprobs2) in zip(
            sync_request, async_request, strict=True
        ):
            assert (ids, finish, stop) == (ids2, finish2, stop2)
            if logprobs is None:
                assert logprobs2 is None
                continue
            for first, second in zip(logprobs, logprobs2, strict=True):
                assert first.rank == second.rank and [t for t, _ in first.top] == [t for t, _ in second.top]
                assert first.logprob == pytest.approx(second.logprob, abs=1e-4)


@pytest.mark.parametrize(
    "limits",
    [
        {},
        {"max_num_batched_tokens": 8, "max_num_seqs": 3},  # chunked prefill, requests queue
        {"num_blocks": 9, "enable_prefix_caching": False},  # 144 KV slots for ~230 tokens: preemption
    ],
    ids=["batched", "chunked", "preempting"],
)
def test_engine_async_on_equals_off(llm: LLM, limits: dict[str, Any]) -> None:
    _use_core(llm, "off")
    params = _mixed_params(_stop_token(llm))
    _use_core(llm, "off", **limits)
    off = _run(llm, _enginevaried_prompts(), params)
    on_core = _use_core(llm, "on", **limits)
    on = _run(llm, _enginevaried_prompts(), params)
    _same_outputs(off, on)
    assert off[2][0][1] == "stop" and len(off[2][0][0]) < 20  # the stop token did end a request early
    if "num_blocks" in limits:
        assert on_core.stats().num_preemptions > 0


def test_engine_prefix_hits_async(llm: LLM) -> None:
    base = _enginevaried_prompts()[4]
    prompts = [[*base, 11, 12], [*base, 13], [*base, 11, 12]]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    _use_core(llm, "off", enable_prefix_caching=False)
    expected = _run(llm, prompts, [greedy] * 3)
    core = _use_core(llm, "on")
    first = _run(llm, prompts[:1], [greedy])
    rest = _run(llm, prompts[1:], [greedy] * 2)
    assert first + rest == expected
    assert core.stats().prefix_cache_hits > 0


def _core_outputs(core: EngineCore, abort_after: int | None) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    finished: dict[str, FinishReason] = {}
    for step in range(1000):
        if not core.has_work():
            break
        outputs: list[EngineCoreOutput] = list(core.step())
        if step == abort_after:
            outputs += core.abort_requests(["r1"])
        for output in outputs:
            assert output.request_id not in finished, "output after the request finished"
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finish_reason is not None:
                finished[output.request_id] = output.finish_reason
    assert set(finished) == set(tokens)
    return tokens


def test_engine_abort_mid_flight(llm: LLM) -> None:
    def submit(core: EngineCore) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        for index, prompt in enumerate(_enginevaried_prompts()[:4]):
            core.add_request(EngineCoreRequest(f"r{index}", tuple(prompt), params, (1,), arrival_time=0.0))

    off_core = _use_core(llm, "off")
    submit(off_core)
    expected = _core_outputs(off_core, abort_after=None)
    on_core = _use_core(llm, "on")
    submit(on_core)
    tokens = _core_outputs(on_core, abort_after=3)
    assert 0 < len(tokens["r1"]) < 12 and tokens["r1"] == expected["r1"][: len(tokens["r1"])]
    assert {k: v for k, v in tokens.items() if k != "r1"} == {k: v for k, v in expected.items() if k != "r1"}
    assert_all_blocks_free(on_core.scheduler)
