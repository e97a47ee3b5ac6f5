"""batchlm.tools reads a request's tool fields through protocols, so any object of that shape serves
(not only the HTTP schema's), and it refuses what it cannot serve with ToolUseError naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from batchlm.tools.spec import ToolUseError, tool_plan
from batchlm.tools.use import chat_tool_use


@dataclass
class Function:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


@dataclass
class Tool:
    function: Function
    type: str = "function"


@dataclass
class Named:
    name: str


@dataclass
class NamedChoice:
    function: Named
    type: str = "function"


@dataclass
class ToolFields:
    tools: list[Tool] | None
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool | None = None


WEATHER = Function("get_weather", "Weather of a city.", {"type": "object", "properties": {"city": {}}})


def test_a_named_choice_from_plain_objects_is_decoded_under_its_parameters_schema() -> None:
    plan = tool_plan(
        ToolFields([Tool(WEATHER), Tool(Function("get_time"))], NamedChoice(Named("get_weather")))
    )
    assert plan is not None and plan.mode == "named"
    constraint = plan.structured_outputs()
    assert constraint is not None and constraint.json is not None
    assert json.loads(constraint.json) == WEATHER.parameters


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (ToolFields([Tool(WEATHER), Tool(WEATHER)]), "tools[1]"),
        (ToolFields([Tool(WEATHER, type="retrieval")]), "tools[0].type"),
        (ToolFields([Tool(Function("bad name"))]), "tools[0].function.name"),
        (ToolFields(None, "required"), "tool_choice"),
        (ToolFields([Tool(WEATHER)], NamedChoice(Named("missing"))), "tool_choice"),
    ],
)
def test_tools_that_cannot_be_served_are_refused_naming_the_field(fields: ToolFields, param: str) -> None:
    with pytest.raises(ToolUseError) as refused:
        tool_plan(fields)
    assert refused.value.param == param


def test_auto_without_a_parser_is_refused_as_a_tool_choice_error() -> None:
    with pytest.raises(ToolUseError) as refused:
        chat_tool_use(ToolFields([Tool(WEATHER)], "auto"), "none", None)
    assert refused.value.param == "tool_choice"
