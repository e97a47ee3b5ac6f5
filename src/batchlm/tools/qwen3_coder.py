"""Qwen3-Coder's XML calls, any number of them, with text before, between and after:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A parameter's value is raw text. It becomes JSON by the parameter's type in the function's schema: a
string (or a parameter the schema does not type) stays a string; a number, boolean, null, object or array
is read as JSON where it parses, else kept as a string. The arguments stream as a JSON object that grows
one parameter at a time. A family that writes this markup in tags of its own (Seed-OSS) names them, and
how its template lays a value out, in the parser's `layout` (`CallLayout`).

A stream reads on from the end of the last scan (`Scan.end`) where the output ends in text after the
calls, or inside a parameter's value: a value is sent once whole, so until a `</parameter>` that may
end it arrives, a delta changes nothing of the scan, and only the text from where such a tag could
still begin is read again."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from batchlm.tools.call_grammar import json_rule, marked_calls_start, token_rule
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.json_scan import skip_whitespace
from batchlm.tools.parser import ToolParser
from batchlm.tools.scan import CallScan, MarkedRegion, Scan, scan_marked_calls
from batchlm.unicode_text import encodable

START, END = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"
# Schema types whose values are read as JSON (a string is the text as written).
JSON_TYPES = frozenset({"integer", "number", "boolean", "null", "object", "array"})


@dataclass(frozen=True)
class CallLayout:
    """How a family writes these calls: the tags each call sits between, and the blank its chat template
    writes on either side of a parameter's value (what the grammars lay a call out with; the reader
    takes a value with or without it)."""

    start: str
    end: str
    value_gap: str

    @property
    def after_parameter(self) -> tuple[str, ...]:
        """What may follow a parameter: the next one, the function's end, or the call's end where the
        model left `</function>` out."""
        return (PARAMETER, FUNCTION_END, self.end)


QWEN3_CODER = CallLayout(START, END, "\n")


class Qwen3CoderParser(ToolParser):
    # A family that writes these calls in other tags, or lays values out otherwise, names its own.
    layout = QWEN3_CODER
    markers = (START, END)

    def __init__(self, max_calls: int | None = None, tools: Sequence[FunctionTool] = ()) -> None:
        super().__init__(max_calls, tools)
        self._types = {tool.name: _parameter_types(tool.parameters) for tool in tools}

    def scan(self, text: str, final: bool) -> Scan:
        # Regions read closed or as no call stay so as the output grows: the scan's end is read on.
        return scan_marked_calls(text, self.layout.start, self._region, final, read_on=True)

    def calls_grammar(
        self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int], answer: str | None = None
    ) -> str | None:
        """Free text (or `answer`); from a `<tool_call>` (the layout's opening tag) on, one call of the
        tools in the template's layout and its `</tool_call>`: a strict function's parameters typed as a
        forced call's are (where its schema allows), any other function's free. Where the markers are
        tokens of the tokenizer (Qwen's), the grammar names them and the text may not spell a marker
        out."""
        layout = self.layout
        functions, rules = _function_rules(tools, False, layout.value_gap) or ([], [])
        head = marked_calls_start(
            (layout.start, layout.end), added_tokens, self.max_calls, answer, self._calls_alone(added_tokens)
        )
        return "\n".join([*head, _call_rule(functions), *rules])

    def forced_grammar(self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int]) -> str | None:
        """The calls alone, laid out as the chat template renders them: each function's parameters in
        its schema's order (the required ones always), a string's value as raw text, any other value as
        JSON, so that the arguments read back fit the schema. None for a schema whose constraints raw
        text cannot carry (a string's pattern, format or length; references; open objects): the forced
        call is then plain JSON."""
        built = _function_rules(tools, True, self.layout.value_gap)
        if built is None:
            return None
        functions, rules = built
        return "\n".join([f"start: {self._calls_alone(added_tokens)}", _call_rule(functions), *rules])

    def _calls_alone(self, added_tokens: Mapping[str, int]) -> str:
        """A Lark rule body: the output's calls alone, a newline apart."""
        opening, closing = self.layout.start, self.layout.end
        start, end = token_rule(opening, added_tokens), token_rule(closing, added_tokens)
        block = f"{start or json.dumps(opening)} call {end or json.dumps(closing)}"
        return block if self.max_calls == 1 else f"{block} ({NEWLINE} {block})*"

    def _region(self, text: str, pos: int, final: bool) -> MarkedRegion | None:
        end_tag, after_parameter = self.layout.end, self.layout.after_parameter
        pos = skip_whitespace(text, pos)
        if not text.startswith(FUNCTION, pos):
            unfinished = not final and FUNCTION.startswith(text[pos:])
            return MarkedRegion([], None) if unfinished else None
        name_end = text.find(">", pos + len(FUNCTION))
        if name_end < 0:
            return None if final else MarkedRegion([], None)
        name = text[pos + len(FUNCTION) : name_end].strip()
        if not name or "\n" in name:
            return None
        types = self._types.get(name, {})
        members: list[str] = []
        open_value: OpenValue | None = None
        pos = name_end + 1
        while True:
            pos = skip_whitespace(text, pos)
            if text.startswith(PARAMETER, pos):
                key_end = text.find(">", pos + len(PARAMETER))
                if key_end < 0:
                    break
                value_end, resume = _value_end(text, key_end + 1, final, after_parameter)
                if value_end is None:
                    open_value = OpenValue(text[resume:], after_parameter)
                    break
                key = text[pos + len(PARAMETER) : key_end].strip()
                value = _unwrap(text[key_end + 1 : value_end])
                members.append(f"{json.dumps(key, ensure_ascii=False)}: {_json_value(value, types.get(key))}")
                pos = value_end + len(PARAMETER_END)
                continue
            if text.startswith(FUNCTION_END, pos):
                call = CallScan(name, "{" + ", ".join(members) + "}", True)
                after = skip_whitespace(text, pos + len(FUNCTION_END))
                if text.startswith(end_tag, after):
                    return MarkedRegion([call], after + len(end_tag))
                if not final and end_tag.startswith(text[after:]):
                    return MarkedRegion([call], None)
                # The closing tag left out: what follows the function is text again.
                return MarkedRegion([call], pos + len(FUNCTION_END))
            if text.startswith(end_tag, pos):  # `</function>` left out
                call = CallScan(name, "{" + ", ".join(members) + "}", True)
                return MarkedRegion([call], pos + len(end_tag))
            if final or not _may_begin(text, pos, after_parameter):
                return None
            break
        if final:
            return None
        # Announced once its name is complete; the parameters read so far, the object still open.
        return MarkedRegion([CallScan(name, "{" + ", ".join(members), False)], None, open_value)


class ValueEnd(NamedTuple):
    # Where the value ends; None while it has not.
    at: int | None
    # Where the search may start over once more text has come: no `</parameter>` before it can end
    # the value, whatever follows.
    resume: int


def _value_end(text: str, start: int, final: bool, after_parameter: tuple[str, ...]) -> ValueEnd:
    """Where the parameter value at `start` ends: at the first `</parameter>` that one of
    `after_parameter` follows (the next parameter, the function's end), so that the tag itself may be
    part of a value (code, XML, a forced call's raw text, whose grammar only ends the value at
    `\\n</parameter>\\n`). No end while no such tag has arrived, or (`final`) where none came."""
    search = start
    while (at := text.find(PARAMETER_END, search)) >= 0:
        search = at + len(PARAMETER_END)
        after = skip_whitespace(text, search)
        if text.startswith(after_parameter, after):
            return ValueEnd(at, at)
        if not final and _may_begin(text, after, after_parameter):
            return ValueEnd(None, at)  # what follows may still make it the value's end
    # A tag that later text completes begins in the last characters, if anywhere.
    return ValueEnd(None, max(search, len(text) - len(PARAMETER_END) + 1))


@dataclass(frozen=True)
class OpenValue:
    """An output that ends inside a parameter's value, from the first `</parameter>` that may still end
    it, or the last characters that may begin one (`window`: the output's text from there). Text that
    ends no value changes nothing of the scan: a value is sent once whole."""

    window: str
    # What may follow a parameter (CallLayout.after_parameter).
    after_parameter: tuple[str, ...]

    def read(self, delta: str) -> tuple[str, OpenValue] | None:
        window = self.window + delta
        end = _value_end(window, 0, False, self.after_parameter)
        if end.at is not None:
            return None
        return "", OpenValue(window[end.resume :], self.after_parameter)


def _may_begin(text: str, pos: int, tags: tuple[str, ...]) -> bool:
    """Whether more text may make text[pos:] begin with one of `tags` (it is a prefix of one). The
    length is compared first: a stream's text is re-read as it grows, and a long rest is no prefix."""
    return any(len(text) - pos <= len(tag) and tag.startswith(text[pos:]) for tag in tags)


def _parameter_types(parameters: dict[str, Any] | None) -> dict[str, set[str]]:
    """Each declared parameter's JSON types (`type`, a list of them, or those of `anyOf`/`oneOf`)."""
    properties = (parameters or {}).get("properties")
    if not isinstance(properties, dict):
        return {}
    return {key: _types_of(schema) for key, schema in properties.items() if isinstance(schema, dict)}


def _types_of(schema: dict[str, Any]) -> set[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {kind for kind in declared if isinstance(kind, str)}
    options = schema.get("anyOf") or schema.get("oneOf") or []
    return {kind for option in options if isinstance(option, dict) for kind in _types_of(option)}


def _unwrap(value: str) -> str:
    """The value as written between its tags, less the newline the template puts on either side."""
    value = value.removeprefix("\n")
    return value.removesuffix("\n")


def _json_value(value: str, types: set[str] | None) -> str:
    if not types or "string" in types or not types & JSON_TYPES:
        return json.dumps(value, ensure_ascii=False)
    text = value.strip()
    # Python's spellings, which the chat template renders a call's values in (`| string`).
    if "boolean" in types and text in ("True", "False"):
        text = text.lower()
    if "null" in types and text == "None":
        text = "null"
    try:
        return encodable(json.dumps(json.loads(text), ensure_ascii=False))
    except (ValueError, RecursionError):  # RecursionError: nested past Python's reader
        return json.dumps(value, ensure_ascii=False)


# Keys an arguments schema may hold beside its properties; any other asks for what the layout cannot say.
_TOP_KEYS = frozenset(
    {"type", "properties", "required", "additionalProperties", "title", "description", "$schema"}
)
# A string parameter with any of these is held to more than raw text can be checked for here.
_STRING_CONSTRAINTS = ("pattern", "format", "minLength", "maxLength", "const")
NEWLINE = json.dumps("\n")


def _free_parameter_rules(gap: str) -> list[str]:
    """Parameters of a function whose calls are not held to its schema: any names, raw values, the
    value `gap` apart from its tags."""
    return [
        f"free_parameter: {json.dumps(PARAMETER)} PARAMETER_NAME {json.dumps('>' + gap)} free_value",
        "PARAMETER_NAME: /[^>\\n]+/",
        f"free_value[lazy]: /(?s:.*)/ {_closing(gap)}",
    ]


def _closing(gap: str) -> str:
    """A Lark string: what ends a parameter, from the end of its value on."""
    return json.dumps(f"{gap}{PARAMETER_END}\n")


def _call_rule(functions: list[str]) -> str:
    """`call`: what comes between the call's markers, one of the functions' rules."""
    return f"call: {NEWLINE} ({' | '.join(functions)}) {NEWLINE}"


def _function_rules(
    tools: Sequence[FunctionTool], forced: bool, gap: str
) -> tuple[list[str], list[str]] | None:
    """The name of each function's rule, and the rules. Forced: every function's parameters typed
    (None where a schema does not allow it); else a strict function's where its schema allows, the
    others free. gap: the blank between a parameter's value and its tags (CallLayout.value_gap)."""
    names: list[str] = []
    rules: list[str] = []
    free = False
    for index, tool in enumerate(tools):
        typed = _parameter_rules(tool.closed_parameters, f"f{index}", gap) if forced or tool.strict else None
        if typed is None:
            if forced:
                return None
            typed, free = ("free_parameter*", []), True
        body, more = typed
        head = json.dumps(f"<function={tool.name}>\n")
        rules += [f"f{index}: {head} {body} {json.dumps(FUNCTION_END)}", *more]
        names.append(f"f{index}")
    return names, rules + (_free_parameter_rules(gap) if free else [])


def _parameter_rules(schema: dict[str, Any], prefix: str, gap: str) -> tuple[str, list[str]] | None:
    """The rule body of a call's parameters, and the rules it refers to; None where unsupported."""
    if set(schema) - _TOP_KEYS or schema.get("additionalProperties", True) is not False:
        return None
    if "$ref" in json.dumps(schema):
        return None
    properties = schema.get("properties", {})
    required = set(schema.get("required", ()))
    if not isinstance(properties, dict):
        return None
    parts: list[str] = []
    rules: list[str] = []
    for position, (key, prop) in enumerate(properties.items()):
        if not isinstance(prop, dict):
            return None
        name = f"{prefix}_p{position}"
        value = _value_rule(prop, f"{name}_v", gap)
        if value is None:
            return None
        opening = json.dumps(f"{PARAMETER}{key}>{gap}")
        rules += [f"{name}: {opening} {value[0]}", *value[1]]
        parts.append(name if key in required else f"{name}?")
    return " ".join(parts) or '""', rules


def _value_rule(prop: dict[str, Any], name: str, gap: str) -> tuple[str, list[str]] | None:
    """A parameter's value and its closing tag, as the parser reads it back into the declared type."""
    closing = _closing(gap)
    types = _types_of(prop)
    if types & JSON_TYPES and "string" not in types:
        return f"{name} {closing}", [f"{name}: {json_rule(prop, rendered=True)}"]
    if any(key in prop for key in _STRING_CONSTRAINTS):
        return None
    if "enum" in prop:
        choices = prop["enum"]
        if not choices or not all(isinstance(choice, str) and "\n" not in choice for choice in choices):
            return None
        return f"({' | '.join(json.dumps(choice) for choice in choices)}) {closing}", []
    # Raw text up to the first closing tag: one lazy lexeme, which ends where the tag first appears.
    return name, [f"{name}[lazy]: /(?s:.*)/ {closing}"]
