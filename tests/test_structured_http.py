"""Structured outputs over HTTP against the torch engine on the tiny random-weight llama: response_format
(json_schema, json_object), structured_outputs and guided_* on chat and completions, streaming, the
openai client's parse and stream helpers, and 400s that name a bad schema or grammar."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.server.background import BackgroundServer
from grammar_walk import BRANCHING_ENDLESS, ENDLESS_LIMIT
from live_server import serving

USER = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "member"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
}


SELF_REQUIRED = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
# Past llguidance's 2,000 items in a parser row once "{" is taken.
MANY_OPTIONAL = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(700)}}
CONTRADICTORY = {"type": "array", "minItems": 3, "maxItems": 1}


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=150)
    colour: Literal["red", "green", "blue"]
    member: bool


@pytest.fixture(scope="module")
def server(tiny_model_dir: Callable[..., Path]) -> Iterator[BackgroundServer]:
    config = EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", served_model_name="tiny")
    with serving(AsyncLLMEngine(config, multiprocess=False)) as running:
        yield running


def test_response_format_json_schema(client: Any) -> None:
    response = client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=100,
        temperature=1.0,
        seed=1,
        n=3,
        response_format=JSON_SCHEMA_FORMAT,
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_response_format_json_object(client: Any) -> None:
    response = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=120, temperature=0.0, response_format={"type": "json_object"}
    )
    choice = response.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_openai_parse_helper(client: Any) -> None:
    completion = client.chat.completions.parse(
        model="tiny", messages=USER, max_tokens=100, temperature=0.0, response_format=Person
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Person)


def test_openai_stream_helper(client: Any) -> None:
    with client.chat.completions.stream(
        model="tiny", messages=USER, max_tokens=100, temperature=0.7, seed=4, response_format=Person
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)
    assert "".join(deltas) == final.choices[0].message.content


def test_structured_outputs_on_completions(client: Any) -> None:
    choice = client.completions.create(
        model="tiny",
        prompt="Pick:",
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": ["left", "right"]}},
    )
    assert choice.choices[0].text in ("left", "right")
    regex = client.completions.create(
        model="tiny",
        prompt="Code:",
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[A-Z]{3}[0-9]{2}"}},
    )
    assert re.fullmatch("[A-Z]{3}[0-9]{2}", regex.choices[0].text)
    gbnf = 'root ::= "(" digit ("," digit)* ")"\ndigit ::= [0-9]'
    grammar = client.completions.create(
        model="tiny", prompt="List:", max_tokens=30, extra_body={"structured_outputs": {"grammar": gbnf}}
    )
    text, reason = grammar.choices[0].text, grammar.choices[0].finish_reason
    assert re.fullmatch(r"\([0-9](,[0-9])*\)" if reason == "stop" else r"\([0-9](,[0-9])*,?", text)
    schema = client.completions.create(
        model="tiny",
        prompt="{",
        max_tokens=100,
        extra_body={"structured_outputs": {"json": json.dumps(SCHEMA)}},
    )
    jsonschema.validate(json.loads(schema.choices[0].text), SCHEMA)


def test_structured_outputs_and_guided_fields_on_chat(client: Any) -> None:
    lark = 'start: "yes" | "no"'
    response = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=10, extra_body={"structured_outputs": {"grammar": lark}}
    )
    assert response.choices[0].message.content in ("yes", "no")
    guided = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=10, extra_body={"guided_choice": ["one", "two"]}
    )
    assert guided.choices[0].message.content in ("one", "two")
    guided_json = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=100, temperature=0.0, extra_body={"guided_json": SCHEMA}
    )
    jsonschema.validate(json.loads(guided_json.choices[0].message.content), SCHEMA)


def test_streaming_constrained_output(client: Any) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=100, stream=True, response_format=JSON_SCHEMA_FORMAT
    )
    text, reasons = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    stream = client.completions.create(
        model="tiny",
        prompt="Code:",
        max_tokens=20,
        stream=True,
        extra_body={"structured_outputs": {"regex": "[a-f]{4}"}},
    )
    assert re.fullmatch("[a-f]{4}", "".join(chunk.choices[0].text for chunk in stream if chunk.choices))


def test_max_tokens_cut_is_length(client: Any) -> None:
    response = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=3, response_format=JSON_SCHEMA_FORMAT
    )
    assert response.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strnig"}},
                }
            },
            "response_format",
            "strnig",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "xml"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"structured_outputs": {"regex": "a[b"}}, "structured_outputs", "unclosed character class"),
        ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs", "nothing_here"),
        # Tokens the model's tokenizer lacks: only a check against the tokenizer finds them.
        (
            {"structured_outputs": {"grammar": 'start: "a" <|nonexistent|>'}},
            "structured_outputs",
            "<|nonexistent|>",
        ),
        ({"structured_outputs": {"grammar": 'start: "a" <[99999999]>'}}, "structured_outputs", "99999999"),
        ({"structured_outputs": {"json": "{oops"}}, "structured_outputs", "not valid JSON"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}},
            "response_format",
            "no value satisfies",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        # Grammars that compile but fail where every output begins (structured/start_probe.py).
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SELF_REQUIRED},
                }
            },
            "response_format",
            "has no finite output",
        ),
        ({"structured_outputs": {"json": SELF_REQUIRED}}, "structured_outputs", "has no finite output"),
        ({"guided_regex": "a{1000000}"}, "guided_regex", "too many expressions"),
        ({"guided_grammar": 'start: a\na: "x" a'}, "guided_grammar", "has no finite output"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": MANY_OPTIONAL},
                }
            },
            "response_format",
            "max is 2000",
        ),
        # Contradictory constraints: llguidance's own check finds them.
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": CONTRADICTORY},
                }
            },
            "response_format",
            "minItems (3) is greater than maxItems (1)",
        ),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "empty"),
        ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "guided_regex", "Only one"),
        ({"structured_outputs": {"regex": "a"}, "min_tokens": 2}, "min_tokens", "min_tokens"),
    ],
)
def test_bad_constraints_are_a_400_naming_the_problem(
    server: BackgroundServer, body: dict[str, Any], param: str, fragment: str
) -> None:
    payload = {"model": "tiny", "messages": USER, "max_tokens": 5, **body}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert fragment in error["message"]


def test_bad_grammar_on_completions_is_a_400(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="unclosed"):
        client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body={"guided_regex": "(["})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model="tiny", prompt="x", extra_body={"response_format": {"type": "json_object"}}
        )


def test_a_grammar_naming_the_tokenizers_own_special_token_is_served(client: Any) -> None:
    # <|im_end|> is one of the tiny tokenizer's special tokens (tokenizer/builder.py).
    reply = client.completions.create(
        model="tiny",
        prompt="x",
        max_tokens=5,
        extra_body={
            "structured_outputs": {"grammar": 'start: "ab" <|im_end|>'},
            "skip_special_tokens": False,
        },
    )
    assert reply.choices[0].text.startswith("ab")


def test_the_schema_true_allows_any_json_value(client: Any) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": True}}
    reply = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=12, extra_body={"response_format": response_format}
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        json.loads(choice.message.content)


def test_a_grammar_failing_mid_generation_is_an_error_that_names_it(server: BackgroundServer) -> None:
    # An array or an object, each of a value that is itself an endless array or object: the output's
    # start branches, so the edge's probe passes it, and whichever branch the model takes fails at
    # once. The reply is an error naming the limit, not a 200 whose content is "{".
    response_format = {"type": "json_schema", "json_schema": {"name": "endless", "schema": BRANCHING_ENDLESS}}
    payload = {"model": "tiny", "messages": USER, "max_tokens": 30, "response_format": response_format}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 500, response.text
    message = response.json()["error"]["message"]
    assert "grammar of its structured output failed" in message and ENDLESS_LIMIT in message
    # A stream starts with the request's first output. The failure comes with one of the first tokens,
    # in that output or a later one, as the mask worker's timing has it: a 500 before the stream, or
    # an error event in it.
    for seed in range(8):
        streamed = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={**payload, "stream": True, "seed": seed},
            timeout=60,
        )
        if streamed.status_code == 500:
            assert ENDLESS_LIMIT in streamed.json()["error"]["message"]
            continue
        assert streamed.status_code == 200, streamed.text
        events = [line[len("data: ") :] for line in streamed.text.splitlines() if line.startswith("data: ")]
        errors = [
            json.loads(event)["error"]
            for event in events
            if event != "[DONE]" and "error" in json.loads(event)
        ]
        assert len(errors) == 1 and ENDLESS_LIMIT in errors[0]["message"]
        finishes = [
            choice["finish_reason"]
            for event in events
            if event != "[DONE]" and "choices" in json.loads(event)
            for choice in json.loads(event)["choices"]
        ]
        assert "stop" not in finishes


def test_a_recursive_schema_with_an_end_is_served(client: Any) -> None:
    tree = {
        "type": "object",
        "properties": {
            "v": {"type": "integer"},
            "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2},
        },
        "required": ["v", "kids"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "tree", "schema": tree}}
    reply = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=60, extra_body={"response_format": response_format}
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), tree)
