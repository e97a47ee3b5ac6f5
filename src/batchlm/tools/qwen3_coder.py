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
one parameter at a time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.json_scan import skip_whitespace
from batchlm.tools.parser import ToolParser
from batchlm.tools.scan import CallScan, MarkedRegion, Scan, scan_marked_calls

START, END = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"
# Schema types whose values are read as JSON (a string is the text as written).
JSON_TYPES = frozenset({"integer", "number", "boolean", "null", "object", "array"})


class Qwen3CoderParser(ToolParser):
    def __init__(self, max_calls: int | None = None, tools: Sequence[FunctionTool] = ()) -> None:
        super().__init__(max_calls, tools)
        self._types = {tool.name: _parameter_types(tool.parameters) for tool in tools}

    def scan(self, text: str, final: bool) -> Scan:
        return scan_marked_calls(text, START, self._region, final)

    def _region(self, text: str, pos: int, final: bool) -> MarkedRegion | None:
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
        pos = name_end + 1
        while True:
            pos = skip_whitespace(text, pos)
            if text.startswith(PARAMETER, pos):
                key_end = text.find(">", pos + len(PARAMETER))
                value_end = -1 if key_end < 0 else text.find(PARAMETER_END, key_end + 1)
                if value_end < 0:
                    break
                key = text[pos + len(PARAMETER) : key_end].strip()
                value = _unwrap(text[key_end + 1 : value_end])
                members.append(f"{json.dumps(key, ensure_ascii=False)}: {_json_value(value, types.get(key))}")
                pos = value_end + len(PARAMETER_END)
                continue
            if text.startswith(FUNCTION_END, pos):
                call = CallScan(name, "{" + ", ".join(members) + "}", True)
                after = skip_whitespace(text, pos + len(FUNCTION_END))
                if text.startswith(END, after):
                    return MarkedRegion([call], after + len(END))
                if not final and END.startswith(text[after:]):
                    return MarkedRegion([call], None)
                # The closing tag left out: what follows the function is text again.
                return MarkedRegion([call], pos + len(FUNCTION_END))
            rest = text[pos:]
            if final or not (PARAMETER.startswith(rest) or FUNCTION_END.startswith(rest)):
                return None
            break
        if final:
            return None
        # Announced once its name is complete; the parameters read so far, the object still open.
        return MarkedRegion([CallScan(name, "{" + ", ".join(members), False)], None)


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
    if "boolean" in types and text in ("True", "False"):  # Python's spelling
        text = text.lower()
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return json.dumps(value, ensure_ascii=False)
