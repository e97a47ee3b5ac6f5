"""batchlm.tools reads a request's tool fields through protocols, so any object of that shape serves
(not only the HTTP schema's), and it refuses what it cannot serve with ToolUseError naming the field."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from batchlm.sampling_params import SamplingParams, StructuredOutputs
from batchlm.structured.spec_grammar import validated_grammar
from batchlm.tools.closed_schema import closed_objects
from batchlm.tools.spec import ToolUseError, tool_plan
from batchlm.tools.use import chat_tool_use


@dataclass
class Function:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


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
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | AllowedChoice | None = None
    parallel_tool_calls: bool | None = None


WEATHER = Function("get_weather", "Weather of a city.", {"type": "object", "properties": {"city": {}}})


def test_a_named_choice_from_plain_objects_is_decoded_under_its_parameters_schema() -> None:
    plan = tool_plan(
        ToolFields([Tool(WEATHER), Tool(Function("get_time"))], NamedChoice(Named("get_weather")))
    )
    assert plan is not None and plan.mode == "named"
    constraint = plan.structured_outputs()
    assert constraint is not None and constraint.json is not None
    assert json.loads(constraint.json) == {**WEATHER.parameters, "additionalProperties": False}


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


def test_a_forced_call_s_objects_are_closed_to_keys_they_do_not_declare() -> None:
    address = {"type": "object", "properties": {"zip": {"type": "string"}}}
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "address": address,
            "stops": {"type": "array", "items": address},
            "either": {"anyOf": [address, {"type": "string"}]},
            "free": {"type": "object"},
            "tags": {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}},
            "merged": {"allOf": [address, {"properties": {"plus4": {}}}]},
            "ref": {"$ref": "#/$defs/place"},
        },
        "$defs": {"place": {"type": ["object", "null"], "properties": {"name": {}}}},
    }
    closed = closed_objects(schema)
    closed_address = {**address, "additionalProperties": False}
    assert closed["additionalProperties"] is False
    properties = closed["properties"]
    assert properties["address"] == closed_address
    assert properties["stops"]["items"] == closed_address
    assert properties["either"]["anyOf"] == [closed_address, {"type": "string"}]
    # Said otherwise or left to other schemas: as they were.
    assert properties["free"] == {"type": "object"}
    assert properties["tags"] == schema["properties"]["tags"]
    assert properties["merged"] == schema["properties"]["merged"]
    assert properties["ref"] == {"$ref": "#/$defs/place"}
    assert closed["$defs"]["place"]["additionalProperties"] is False
    assert "additionalProperties" not in schema and "additionalProperties" not in address  # a copy


def test_required_calls_close_each_function_s_arguments() -> None:
    plan = tool_plan(ToolFields([Tool(WEATHER)], "required"))
    assert plan is not None
    constraint = plan.structured_outputs()
    assert constraint is not None and constraint.json is not None
    (option,) = json.loads(constraint.json)["items"]["anyOf"]
    assert option["properties"]["parameters"] == {**WEATHER.parameters, "additionalProperties": False}
    # The chat template still sees the tool as the client declared it.
    assert plan.template_tools()[0]["function"]["parameters"] == WEATHER.parameters


STRICT_WEATHER = Function(
    "get_weather",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    strict=True,
)


def test_auto_with_a_strict_function_decodes_the_family_s_calls_under_a_grammar() -> None:
    use = chat_tool_use(
        ToolFields([Tool(STRICT_WEATHER), Tool(Function("get_time"))], "auto"), "hermes", None
    )
    constraint = use.sampling_params(SamplingParams()).structured_outputs
    assert constraint is not None and constraint.grammar is not None
    assert '"<tool_call>"' in constraint.grammar and "%json" in constraint.grammar
    validated_grammar(constraint)  # compiles
    # Where the tokenizer has the markers as tokens of their own, the grammar names those tokens.
    markers = {"<tool_call>": 151657, "</tool_call>": 151658}
    with_tokens = chat_tool_use(ToolFields([Tool(STRICT_WEATHER)], "auto"), "hermes", None, markers)
    token_grammar = with_tokens.sampling_params(SamplingParams()).structured_outputs
    assert token_grammar is not None and token_grammar.grammar is not None
    assert "start: free (<[151657]> call <[151658]> free)*" in token_grammar.grammar
    validated_grammar(token_grammar)
    # No strict function, or Mistral's family with a tokenizer that lacks its marker token: nothing.
    plain = chat_tool_use(ToolFields([Tool(WEATHER)], "auto"), "hermes", None)
    assert plain.sampling_params(SamplingParams()).structured_outputs is None
    mistral = chat_tool_use(ToolFields([Tool(STRICT_WEATHER)], "auto"), "mistral", None)
    assert mistral.sampling_params(SamplingParams()).structured_outputs is None
    # With JSON, a regex, a choice or a Lark grammar of the client's own asked for, the answer takes the
    # free text's place beside the calls, strict function or not (test_tool_call_grammars walks them);
    # a grammar as a sub-grammar. Where the family has no calls grammar, the client's stays as it is.
    lark = StructuredOutputs(grammar='start: "yes" | "no"')
    beside_lark = plain.sampling_params(SamplingParams(structured_outputs=lark)).structured_outputs
    assert beside_lark is not None and beside_lark.grammar is not None
    assert "answer: @client" in beside_lark.grammar.splitlines()
    assert beside_lark.subgrammars == (("client", lark.grammar),)
    validated_grammar(beside_lark)
    assert mistral.sampling_params(SamplingParams(structured_outputs=lark)).structured_outputs == lark
    for own, rule in [
        (StructuredOutputs(regex="[a-z]+/[0-9]"), "answer: /[a-z]+\\/[0-9]/"),
        # The choices as one terminal (spec_grammar.lark_terminal).
        (StructuredOutputs(choice=("yes", 'a "no"')), 'answer: /(?:yes|a "no")/'),
    ]:
        beside = plain.sampling_params(SamplingParams(structured_outputs=own)).structured_outputs
        assert beside is not None and beside.grammar is not None and rule in beside.grammar.splitlines()
        validated_grammar(beside)
    with pytest.raises(ToolUseError) as bad_regex:
        plain.sampling_params(SamplingParams(structured_outputs=StructuredOutputs(regex="(")))
    assert bad_regex.value.param == "structured_outputs"
    schema = StructuredOutputs(
        json=json.dumps({"type": "object", "properties": {"answer": {"type": "integer"}}})
    )
    combined = plain.sampling_params(SamplingParams(structured_outputs=schema)).structured_outputs
    assert combined is not None and combined.grammar is not None
    assert (
        combined.grammar.startswith("start: answer | ")
        and '"answer": {"type": "integer"}' in combined.grammar
    )
    validated_grammar(combined)
    broken = StructuredOutputs(json='{"type": "strin"}')
    with pytest.raises(ToolUseError) as refused:
        plain.sampling_params(SamplingParams(structured_outputs=broken), "response_format")
    assert refused.value.param == "response_format"


def test_a_decoded_schema_that_does_not_compile_is_refused_naming_its_tool() -> None:
    broken = Function("f", parameters={"type": "object", "properties": {"x": {"type": "strin"}}})
    for fields in (
        ToolFields([Tool(WEATHER), Tool(dataclasses.replace(broken, strict=True))]),
        ToolFields([Tool(WEATHER), Tool(broken)], "required"),
        ToolFields([Tool(WEATHER), Tool(broken)], NamedChoice(Named("f"))),
    ):
        with pytest.raises(ToolUseError) as refused:
            tool_plan(fields)
        assert refused.value.param == "tools[1].function.parameters"
        assert "strin" in str(refused.value)
    # Not decoded under its schema (auto, not strict): the model reads it, nothing compiles it.
    assert tool_plan(ToolFields([Tool(broken)])) is not None


def test_a_forced_call_takes_the_place_of_a_response_format_and_refuses_other_constraints() -> None:
    use = chat_tool_use(ToolFields([Tool(WEATHER)], "required"), "hermes", None)
    answer = StructuredOutputs(json=json.dumps({"type": "object"}))
    forced = use.sampling_params(SamplingParams(structured_outputs=answer), "response_format")
    assert forced.structured_outputs is not None and forced.structured_outputs.grammar is not None
    assert forced.structured_outputs.grammar.startswith('start: block ("\\n" block)*')  # the calls alone
    with pytest.raises(ToolUseError) as refused:
        use.sampling_params(SamplingParams(structured_outputs=answer), "structured_outputs")
    assert refused.value.param == "tool_choice" and "'structured_outputs'" in str(refused.value)


def test_free_text_takes_the_tokenizer_s_other_added_tokens_as_ranges() -> None:
    from batchlm.tools.call_grammar import free_text

    added = {"<tool_call>": 7, "</tool_call>": 8, "<think>": 3, "</think>": 4, "<x>": 5, "<y>": 9}
    rules = free_text(added, ("<tool_call>", "</tool_call>"))
    assert rules[0] == "free: TEXT? (<[3-5,9]> TEXT?)*"
    assert free_text({"<tool_call>": 7}, ("<tool_call>",))[0] == "free: TEXT?"


def test_the_answer_beside_the_calls_takes_the_calls_json_format() -> None:
    from batchlm.tools.call_grammar import CALL_JSON_FORMAT

    use = chat_tool_use(ToolFields([Tool(WEATHER)], "auto"), "llama3_json", None)
    own = {"type": "object", "x-guidance": {"whitespace_flexible": False}}
    params = use.sampling_params(SamplingParams(structured_outputs=StructuredOutputs(json=json.dumps(own))))
    grammar = params.structured_outputs.grammar if params.structured_outputs else None
    assert grammar is not None
    answer = next(line for line in grammar.splitlines() if line.startswith("answer: %json "))
    assert json.loads(answer.removeprefix("answer: %json "))["x-guidance"] == CALL_JSON_FORMAT


def test_a_strict_tool_s_closed_schema_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import batchlm.tools.function_tool as function_tool

    built: list[dict[str, Any]] = []
    monkeypatch.setattr(
        function_tool, "closed_objects", lambda schema: built.append(schema) or closed_objects(schema)
    )
    for choice in ("auto", "required", NamedChoice(Named("get_weather"))):
        built.clear()
        use = chat_tool_use(ToolFields([Tool(STRICT_WEATHER)], choice), "hermes", None)
        constraint = use.sampling_params(SamplingParams()).structured_outputs
        assert constraint is not None
        assert built == [STRICT_WEATHER.parameters], choice


@pytest.mark.parametrize(
    ("choice", "parallel", "starts"),
    [
        (
            "required",
            None,
            'start: block ("\\n" block)*\nblock: "<tool_call>" "\\n" call "\\n" "</tool_call>"',
        ),
        ("required", False, 'start: block\nblock: "<tool_call>"'),
        (NamedChoice(Named("get_weather")), None, 'start: block\nblock: "<tool_call>"'),
    ],
)
def test_a_forced_choice_is_decoded_in_the_family_s_markup_and_read_by_its_parser(
    choice: Any, parallel: bool | None, starts: str
) -> None:
    tools = [Tool(WEATHER), Tool(Function("get_time"))]
    use = chat_tool_use(ToolFields(tools, choice, parallel), "auto", None)
    constraint = use.sampling_params(SamplingParams()).structured_outputs
    assert constraint is not None and constraint.grammar is not None
    assert constraint.grammar.startswith(starts)
    validated_grammar(constraint)
    assert ('"get_time"' in constraint.grammar) == (choice == "required")
    assert use.parser is not None
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parsed = use.parser.extract(reply)
    [call] = parsed.tool_calls
    assert parsed.content is None
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})


@pytest.mark.parametrize("choice", ["required", NamedChoice(Named("get_weather"))])
def test_without_a_parser_or_a_family_grammar_a_forced_choice_is_plain_json(choice: Any) -> None:
    """--tool-call-parser none, or a family whose tokenizer lacks its markers (Mistral's without
    [TOOL_CALLS], Granite's without <|tool_call|>): the calls as a JSON array (vLLM's form), or the named
    function's arguments."""
    for setting in ("none", "mistral", "granite"):
        use = chat_tool_use(ToolFields([Tool(WEATHER)], choice), setting, None)
        constraint = use.sampling_params(SamplingParams()).structured_outputs
        assert constraint is not None and constraint.json is not None
        schema = json.loads(constraint.json)
        assert schema["type"] == ("array" if choice == "required" else "object")


@dataclass
class Allowed:
    mode: str
    tools: list[NamedChoice]


@dataclass
class AllowedChoice:
    allowed_tools: Allowed
    type: str = "allowed_tools"


def allowed(mode: str, *names: str) -> AllowedChoice:
    return AllowedChoice(Allowed(mode, [NamedChoice(Named(name)) for name in names]))


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_call_markers_the_tokenizer_has_as_special_tokens_are_kept_in_the_text(choice: str) -> None:
    """Where `<tool_call>` is a special token (Granite 4's), a text decoded without special tokens would
    lose it and every call would read as text: the detokenizer keeps them, as for Mistral's marker."""
    markers = {"<tool_call>": 100, "</tool_call>": 101, "<|end_of_text|>": 0}
    fields = ToolFields([Tool(WEATHER)], choice)
    special = chat_tool_use(fields, "hermes", None, markers, hidden_ids=frozenset({0, 100, 101}))
    assert special.sampling_params(SamplingParams()).skip_special_tokens is False
    plain = chat_tool_use(fields, "hermes", None, markers, hidden_ids=frozenset({0}))
    assert plain.sampling_params(SamplingParams()).skip_special_tokens is True
    # Llama 3's parser reads calls without its `<|python_tag|>` token; tool_choice none parses nothing.
    llama = chat_tool_use(fields, "llama3_json", None, {"<|python_tag|>": 7}, hidden_ids=frozenset({7}))
    assert llama.sampling_params(SamplingParams()).skip_special_tokens is True
    none = chat_tool_use(ToolFields([Tool(WEATHER)], "none"), "hermes", None, markers, frozenset({100}))
    assert none.sampling_params(SamplingParams()).skip_special_tokens is True
