"""Constrained decoding in the torch engine (CPU, tiny random-weight model): outputs parse and validate
under their schema alone, with n > 1, prefix caching, preemption and async scheduling; max_tokens cuts
end with "length"; unconstrained requests in the same batches keep exactly their tokens."""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from batchlm import LLM, SamplingParams
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.llguidance_backend import LLGuidanceBatch
from grammar_walk import BRANCHING_ENDLESS, ENDLESS_LIMIT

# Bounded fields, so that random weights finish the object within the token budget.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["name", "age", "member", "colour", "tags", "level"],
    "additionalProperties": False,
}
SPEC = StructuredOutputs(json=json.dumps(SCHEMA))
PROMPTS = ["Tell me about a person:", "JSON please", "The quick brown fox", "x"]


def constrained(temperature: float = 0.0, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=120, structured_outputs=SPEC, **kwargs)


def assert_valid(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def _llm(model_dir: Path, **kwargs: Any) -> LLM:
    return LLM(model=str(model_dir), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return _llm(llama_dir)


def test_schema_outputs_validate_greedy_and_sampled(llm: LLM) -> None:
    for params in (
        constrained(),
        constrained(temperature=1.0, seed=7),
        constrained(temperature=1.5, top_p=0.9),
    ):
        for output in llm.generate(PROMPTS, params):
            completion = output.outputs[0]
            assert completion.finish_reason == "stop"
            assert_valid(completion.text)


def test_every_sequence_of_n_gets_its_own_matcher(llm: LLM) -> None:
    outputs = llm.generate(PROMPTS[:2], constrained(temperature=1.0, n=4, seed=3))
    texts = [c.text for o in outputs for c in o.outputs]
    assert len(texts) == 8
    for text in texts:
        assert_valid(text)
    assert len(set(texts)) > 1, "seeded children draw different samples"


def test_max_tokens_cut_ends_with_length(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4, structured_outputs=SPEC)
    completion = llm.generate(["Hello"], params)[0].outputs[0]
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == 4
    assert completion.text.startswith('{"')


def test_regex_choice_and_grammar_outputs(llm: LLM) -> None:
    regex = SamplingParams(
        temperature=1.0,
        seed=1,
        max_tokens=40,
        structured_outputs=StructuredOutputs(regex=r"[a-z]{2,5}-[0-9]{3}"),
    )
    choice = SamplingParams(
        temperature=1.0,
        max_tokens=40,
        structured_outputs=StructuredOutputs(choice=("alpha", "beta", "gamma")),
    )
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]/'
    grammar = SamplingParams(
        temperature=1.0, seed=2, max_tokens=40, structured_outputs=StructuredOutputs(grammar=lark)
    )
    for output in llm.generate(PROMPTS, regex):
        assert re.fullmatch(r"[a-z]{2,5}-[0-9]{3}", output.outputs[0].text)
    for output in llm.generate(PROMPTS, choice):
        assert output.outputs[0].text in ("alpha", "beta", "gamma")
    for output in llm.generate(PROMPTS, grammar):
        completion = output.outputs[0]
        if completion.finish_reason == "stop":
            assert re.fullmatch(r"\([0-9](\+[0-9])*\)", completion.text)
        else:
            assert re.fullmatch(r"\([0-9](\+[0-9])*", completion.text)


def test_logprobs_come_from_the_masked_distribution(llm: LLM) -> None:
    params = SamplingParams(
        temperature=0.0, max_tokens=3, logprobs=5, structured_outputs=StructuredOutputs(regex="[01]")
    )
    completion = llm.generate(["Bits:"], params)[0].outputs[0]
    assert completion.text in ("0", "1")
    first = completion.logprobs[0]
    mass = sum(math.exp(v) for _, v in first.top if math.isfinite(v))
    assert mass == pytest.approx(1.0, abs=1e-4)


def test_prefix_caching_and_preemption_keep_outputs(llama_dir: Path, llm: LLM) -> None:
    prompts = [p + " again" * i for i, p in enumerate(PROMPTS * 2)]
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, constrained())]
    # 40 blocks of 4 tokens: one request fits, all eight do not.
    small = _llm(llama_dir, block_size=4, num_gpu_blocks_override=40, enable_prefix_caching=True)
    outputs = small.generate(prompts, constrained())
    assert small.engine_core.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == reference
    for output in outputs:
        assert_valid(output.outputs[0].text)
    # Served again from the prefix cache.
    again = small.generate(prompts, constrained())
    assert small.engine_core.stats().prefix_cache_hits > 0
    assert [o.outputs[0].token_ids for o in again] == reference


def test_async_scheduling_gives_the_same_tokens(llama_dir: Path, llm: LLM) -> None:
    params = [
        constrained(),
        SamplingParams(temperature=0.0, max_tokens=30),
        constrained(temperature=1.0, seed=5),
    ]
    prompts = PROMPTS[:3]
    sync = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    async_llm = _llm(llama_dir, async_scheduling="on")
    assert async_llm.engine_core.async_scheduling
    outputs = async_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == sync
    assert_valid(outputs[0].outputs[0].text)
    assert_valid(outputs[2].outputs[0].text)


ENDLESS = StructuredOutputs(json=json.dumps(BRANCHING_ENDLESS))


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_a_grammar_failing_mid_generation_ends_in_an_error_naming_it(
    llama_dir: Path, llm: LLM, scheduling: str
) -> None:
    engine = llm if scheduling == "off" else _llm(llama_dir, async_scheduling="on")
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=ENDLESS),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        constrained(),
    ]
    failed, plain, sound = engine.generate(PROMPTS[:3], params)
    assert failed.outputs[0].finish_reason == "error"
    assert failed.error is not None and ENDLESS_LIMIT in failed.error
    assert "grammar of its structured output failed" in failed.error
    # Its batch goes on: the others finish as they would alone.
    assert plain.outputs[0].finish_reason == "length" and len(plain.outputs[0].token_ids) == 20
    assert sound.outputs[0].finish_reason == "stop"
    assert_valid(sound.outputs[0].text)
    assert engine.engine_core.stats().num_running == 0


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_a_grammar_engine_that_raises_ends_its_requests_and_the_engine_goes_on(
    llama_dir: Path, scheduling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _llm(llama_dir, async_scheduling=scheduling)
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    [alone] = engine.generate(["The quick brown fox"], plain)
    steps = itertools.count()
    advance_one = LLGuidanceBatch.advance_one

    def raising_on_the_third_step(batch: LLGuidanceBatch, token_ids: list[int]) -> list[bool]:
        if next(steps) == 2:
            raise RuntimeError("injected matcher failure")
        return advance_one(batch, token_ids)

    monkeypatch.setattr(LLGuidanceBatch, "advance_one", raising_on_the_third_step)
    failed, beside = engine.generate(["x", "The quick brown fox"], [constrained(), plain])
    assert failed.outputs[0].finish_reason == "error" and failed.error is not None
    assert "grammar engine raised RuntimeError: injected matcher failure" in failed.error
    assert beside.outputs[0].token_ids == alone.outputs[0].token_ids
    monkeypatch.undo()
    [after] = engine.generate(["x"], constrained())
    assert after.outputs[0].finish_reason == "stop"
    assert_valid(after.outputs[0].text)
    assert engine.engine_core.stats().num_running == 0


def test_32_constrained_with_32_unconstrained(llm: LLM) -> None:
    """Constrained rows are valid; the unconstrained rows sharing their batches keep exactly the tokens
    they get without them."""
    plain_prompts = [f"plain request {i}" for i in range(32)]
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(plain_prompts, plain)]
    mixed_prompts, mixed_params = [], []
    for i in range(32):
        mixed_prompts += [f"constrained request {i}", plain_prompts[i]]
        mixed_params += [constrained(temperature=1.0 if i % 2 else 0.0, seed=i), plain]
    outputs = llm.generate(mixed_prompts, mixed_params)
    for output in outputs[0::2]:
        assert output.outputs[0].finish_reason == "stop"
        assert_valid(output.outputs[0].text)
    assert [o.outputs[0].token_ids for o in outputs[1::2]] == alone


def test_bad_schema_is_rejected_before_it_runs(llm: LLM) -> None:
    bad = SamplingParams(structured_outputs=StructuredOutputs(json='{"type": "objekt"}'))
    with pytest.raises(ValueError, match="objekt"):
        llm.generate(["Hi"], bad)
    with pytest.raises(ValueError, match="min_tokens"):
        llm.generate(["Hi"], constrained(min_tokens=2))


def test_matchers_are_freed_on_finish_and_abort(llm: LLM) -> None:
    core = llm.engine_core
    runner = core.executor
    eos = llm.tokenizer.eos_token_ids
    for index in range(3):
        params = constrained(temperature=1.0, seed=index)
        core.add_request(EngineCoreRequest(f"abort-{index}", (0, 5, 6 + index), params, eos, time.time()))
    for _ in range(3):
        core.step()
    assert len(runner.grammars) == 3
    core.abort_requests(["abort-0", "abort-2"])
    core.step()
    assert "abort-0" not in runner.grammars and "abort-1" in runner.grammars
    while core.has_work():
        core.step()
    core.step()  # the finished request's drop reaches the runner with the next step
    assert len(runner.grammars) == 0


def test_tensor_parallel_ranks_mask_alike(llama_dir: Path, llm: LLM) -> None:
    """Every rank keeps its own matchers; they see the same tokens, so TP=2 samples what TP=1 does."""
    params = [constrained(), constrained(temperature=1.0, seed=11)]
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)]
    tp = _llm(llama_dir, tensor_parallel_size=2)
    try:
        outputs = tp.generate(PROMPTS[:2], params)
    finally:
        tp.engine_core.executor.shutdown()  # type: ignore[attr-defined]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for output in outputs:
        assert_valid(output.outputs[0].text)
