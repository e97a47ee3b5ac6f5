"""Narrowed and nested tool declarations: OpenAI's `allowed_tools` choice (calls of some tools while
the template sees all), and arguments whose schema points into its own `$defs` (a nested pydantic
model) inside the calls' grammar. The request stand-ins are test_tool_spec's."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from batchlm.sampling_params import SamplingParams
from batchlm.structured.spec_grammar import validated_grammar
from batchlm.tools.spec import ToolUseError, tool_plan
from batchlm.tools.use import chat_tool_use
from test_tool_spec import (
    WEATHER,
    Allowed,
    AllowedChoice,
    Function,
    Named,
    NamedChoice,
    Tool,
    ToolFields,
    allowed,
)


def test_an_allowed_tools_choice_decodes_calls_of_its_tools_alone_while_the_template_sees_all() -> None:
    """OpenAI's allowed_tools (pydantic-ai sends it to narrow an agent's step): the prompt keeps every
    tool, so the prefix cache still serves it, and the calls' grammar names only the allowed ones."""
    tools = [Tool(WEATHER), Tool(Function("get_time"))]
    for mode in ("required", "auto"):
        use = chat_tool_use(ToolFields(tools, allowed(mode, "get_time")), "auto", None)
        assert use.plan is not None and use.plan.mode == mode
        assert [tool["function"]["name"] for tool in use.template_tools or ()] == ["get_weather", "get_time"]
        # Under auto too: with no strict function, the grammar is there to hold the names.
        constraint = use.sampling_params(SamplingParams()).structured_outputs
        assert constraint is not None and constraint.grammar is not None
        validated_grammar(constraint)
        assert '"get_time"' in constraint.grammar and '"get_weather"' not in constraint.grammar
    # Without a family grammar: the plain JSON array of calls takes the allowed function alone.
    use = chat_tool_use(ToolFields(tools, allowed("required", "get_time")), "none", None)
    constraint = use.sampling_params(SamplingParams()).structured_outputs
    assert constraint is not None and constraint.json is not None
    assert '"get_weather"' not in constraint.json and '"get_time"' in constraint.json


def test_an_allowed_tools_choice_of_every_tool_is_the_plain_mode() -> None:
    tools = [Tool(WEATHER), Tool(Function("get_time"))]
    plan = tool_plan(ToolFields(tools, allowed("auto", "get_time", "get_weather")))
    assert plan is not None and (plan.mode, plan.allowed) == ("auto", None)
    assert (
        chat_tool_use(ToolFields(tools, allowed("auto", "get_time", "get_weather")), "auto", None).forced
        is None
    )


@pytest.mark.parametrize(
    ("choice", "param"),
    [
        (allowed("required", "nope"), "tool_choice.allowed_tools.tools[0]"),
        (allowed("required"), "tool_choice.allowed_tools.tools"),
        (allowed("sometimes", "get_time"), "tool_choice.allowed_tools.mode"),
        (
            AllowedChoice(Allowed("auto", [NamedChoice(Named("get_time"), type="mcp")])),
            "tool_choice.allowed_tools.tools[0].type",
        ),
    ],
)
def test_an_allowed_tools_choice_that_cannot_be_served_is_refused_naming_the_field(
    choice: AllowedChoice, param: str
) -> None:
    with pytest.raises(ToolUseError) as caught:
        tool_plan(ToolFields([Tool(WEATHER), Tool(Function("get_time"))], choice))
    assert caught.value.param == param


# A function whose arguments hold a model, as pydantic (openai.pydantic_function_tool, the Agents SDK's
# function_tool, LangChain's tools) writes it: the nested model in `$defs`, referred to from the root.
LOCATED = Function(
    "get_weather",
    None,
    {
        "$defs": {
            "Loc": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "country": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
                "required": ["city", "country"],
            },
        },
        "type": "object",
        "properties": {
            "location": {"$ref": "#/$defs/Loc"},
            "also": {"type": "array", "items": {"$ref": "#"}},
        },
        "required": ["location"],
    },
    strict=True,
)


@pytest.mark.parametrize("setting", ["auto", "none", "llama3_json"])
@pytest.mark.parametrize("choice", ["auto", "required", NamedChoice(Named("get_weather"))])
def test_arguments_that_refer_into_their_own_defs_compile_inside_the_calls_grammar(
    setting: str, choice: Any
) -> None:
    """The arguments' pointers are read from the root of the calls' schema, so their `$defs` go there."""
    if setting == "none" and choice == "auto":
        return
    use = chat_tool_use(ToolFields([Tool(LOCATED), Tool(Function("get_time"))], choice), setting, None)
    constraint = use.sampling_params(SamplingParams()).structured_outputs
    assert constraint is not None
    validated_grammar(constraint)
    if constraint.json is not None:
        schema = json.loads(constraint.json)
        arguments = {
            "location": {"city": "Paris", "country": None},
            "also": [{"location": {"city": "Rome", "country": "Italy"}}],
        }
        instance = arguments if choice != "required" else [{"name": "get_weather", "parameters": arguments}]
        jsonschema.validate(instance, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(json.dumps(instance).replace('"city"', '"town"')), schema)
