"""Structured outputs on the mlx backend (mlx's CPU build here): the grammar processor masks each
constrained request's logits, so outputs parse and validate, beside unchanged unconstrained requests."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

import batchlm.backends.mlx  # noqa: F401  (first: it imports mlx-lm, keeping the open-file limit)

pytest.importorskip("mlx_lm")

from batchlm.backends.mlx.loader import LoadedModel, load_model
from batchlm.backends.mlx.loop import GenerationLoop, LoopSettings
from batchlm.config import EngineConfig
from batchlm.outputs import EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams, StructuredOutputs
from batchlm.structured.factory import backend_factory
from batchlm.tokenizer.tokenizer import Tokenizer

EOS = (1, 3)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b", "c"]},
    },
    "required": ["name", "n", "ok", "kind"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedModel:
    return load_model(EngineConfig(model=str(model_dir)), model_dir)


def make_loop(loaded: LoadedModel, model_dir: Path) -> GenerationLoop:
    settings = LoopSettings(
        max_num_seqs=16, prefill_step_size=64, prefill_batch_size=4, kv_budget_bytes=1 << 28
    )
    grammars = backend_factory(EngineConfig(model=str(model_dir)), model_dir, loaded.vocab_size)
    return GenerationLoop(loaded.model, loaded.vocab_size, settings, "tiny", grammar_backend=grammars)


def request(request_id: str, prompt: list[int], seed: int | None = None, **params: Any) -> EngineCoreRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 100)
    return EngineCoreRequest(request_id, tuple(prompt), SamplingParams(**params), EOS, time.time(), seed=seed)


def run(loop: GenerationLoop, requests: list[EngineCoreRequest]) -> dict[str, list[EngineCoreOutput]]:
    for item in requests:
        loop.add_request(item)
    outputs: dict[str, list[EngineCoreOutput]] = {}
    for _ in range(2000):
        if not loop.has_work():
            return outputs
        for output in loop.step():
            outputs.setdefault(output.request_id, []).append(output)
    raise AssertionError("the loop never finished")


def text_of(tokenizer: Tokenizer, outputs: list[EngineCoreOutput]) -> tuple[str, FinishReason | None]:
    ids = [t for o in outputs for t in o.new_token_ids]
    reason = outputs[-1].finish_reason
    if reason is FinishReason.STOP and ids and ids[-1] in EOS:
        ids = ids[:-1]
    return tokenizer.decode(ids), reason


def test_constrained_requests_validate_and_plain_ones_are_unchanged(
    loaded: LoadedModel, model_dir: Path, tiny_tokenizer: Tokenizer
) -> None:
    schema = StructuredOutputs(json=json.dumps(SCHEMA))
    regex = StructuredOutputs(regex="[a-z]{3}-[0-9]{2}")
    plain = [request(f"plain{i}", [0, 10 + i, 20 + i], max_tokens=12, ignore_eos=True) for i in range(4)]
    alone = run(make_loop(loaded, model_dir), plain)
    constrained = [
        request(f"json{i}", [0, 30 + i], seed=i, temperature=1.0, structured_outputs=schema) for i in range(4)
    ]
    constrained += [request("greedy-json", [0, 44], structured_outputs=schema)]
    constrained += [
        request(f"re{i}", [0, 50 + i], seed=i, temperature=1.0, structured_outputs=regex) for i in range(3)
    ]
    mixed = run(make_loop(loaded, model_dir), constrained + plain)
    for item in constrained:
        text, reason = text_of(tiny_tokenizer, mixed[item.request_id])
        assert reason is FinishReason.STOP
        if item.request_id.startswith("re"):
            assert re.fullmatch("[a-z]{3}-[0-9]{2}", text)
        else:
            jsonschema.validate(json.loads(text), SCHEMA)
    for item in plain:
        tokens = [t for o in mixed[item.request_id] for t in o.new_token_ids]
        assert tokens == [t for o in alone[item.request_id] for t in o.new_token_ids]


def test_length_cut_and_masked_logprobs(loaded: LoadedModel, model_dir: Path) -> None:
    schema = StructuredOutputs(json=json.dumps(SCHEMA))
    bits = StructuredOutputs(regex="[01]")
    outputs = run(
        make_loop(loaded, model_dir),
        [
            request("cut", [0, 7], max_tokens=3, structured_outputs=schema),
            request("bit", [0, 8], logprobs=5, structured_outputs=bits),
        ],
    )
    assert outputs["cut"][-1].finish_reason is FinishReason.LENGTH
    first = outputs["bit"][0].new_logprobs[0]
    finite = [v for _, v in first.top if v != float("-inf")]
    assert sum(2.718281828459045**v for v in finite) == pytest.approx(1.0, abs=1e-3)


def test_a_bad_grammar_fails_only_its_request(loaded: LoadedModel, model_dir: Path) -> None:
    bad = request("bad", [0, 9], structured_outputs=StructuredOutputs(grammar="start: undefined_rule"))
    good = request("good", [0, 9], max_tokens=4)
    outputs = run(make_loop(loaded, model_dir), [bad, good])
    assert outputs["bad"][-1].finish_reason is FinishReason.ERROR
    assert "undefined_rule" in (outputs["bad"][-1].error or "")
    assert outputs["good"][-1].finish_reason is FinishReason.LENGTH


def test_response_format_through_the_mlx_server(model_dir: Path) -> None:
    import batchlm.backends as backends
    from batchlm.server.background import BackgroundServer
    from fake_engine import openai_client, wait_until

    engine = backends.create_engine("mlx", EngineConfig(model=str(model_dir), served_model_name="tiny"))
    running = BackgroundServer(engine, start_engine=engine.start).start()
    try:
        wait_until(
            lambda: httpx.get(f"{running.base_url}/health").status_code == 200, 120, "the engine to load"
        )
        client = openai_client(running.base_url)
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
        }
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "JSON"}],
            max_tokens=100,
            response_format=response_format,
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
        # Beside a strict tool: the answer in its schema, or a call whose arguments fit the tool's (one
        # call, bounded arguments: a random model's reply ends within max_tokens either way).
        bounded = {"type": "integer", "minimum": 0, "maximum": 99}
        arguments = {"type": "object", "properties": {"n": bounded}, "required": ["n"]}
        tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": arguments}}
        for seed in range(3):
            reply = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "JSON or a call"}],
                max_tokens=100,
                response_format=response_format,
                tools=[tool],
                parallel_tool_calls=False,
                seed=seed,
                temperature=1.0,
            )
            choice = reply.choices[0]
            assert choice.finish_reason in ("stop", "tool_calls"), "100 tokens hold an answer or a call"
            for call in choice.message.tool_calls or ():
                jsonschema.validate(
                    json.loads(call.function.arguments), {**arguments, "additionalProperties": False}
                )
            if not choice.message.tool_calls:
                jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    finally:
        assert running.stop() == 0


def test_a_grammar_failing_mid_generation_ends_its_request_in_an_error(
    loaded: LoadedModel, model_dir: Path
) -> None:
    # Past llguidance's 2,000 items in a parser row, an object of 700 optional properties fails at its
    # first token: the request ends in an error naming that, not as a stop with "{" for its output.
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(700)}}
    failing = request("many", [0, 9], structured_outputs=StructuredOutputs(json=json.dumps(many)))
    good = request("good", [0, 9], max_tokens=4)
    outputs = run(make_loop(loaded, model_dir), [failing, good])
    last = outputs["many"][-1]
    assert last.finish_reason is FinishReason.ERROR
    assert "grammar of its structured output failed" in (last.error or "") and "max is 2000" in (
        last.error or ""
    )
    assert outputs["good"][-1].finish_reason is FinishReason.LENGTH
