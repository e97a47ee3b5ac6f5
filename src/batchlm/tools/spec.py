"""A request's `tools`, `tool_choice` and `parallel_tool_calls`, checked at the edge, and what they ask of
the generation: the tools the chat template sees, the constraint a forced call is decoded under, and the
parser that reads the calls back."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from batchlm.sampling_params import NON_FINITE_SCHEMA, StructuredOutputs
from batchlm.structured.backend import GrammarError
from batchlm.structured.start_probe import edge_checked_grammar
from batchlm.tools.forced import NamedFunctionParser, RequiredCallsParser
from batchlm.tools.function_tool import NO_PARAMETERS, FunctionTool, calls_array_schema
from batchlm.tools.parser import ToolParser

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")

ToolMode = Literal["none", "auto", "required", "named"]


class ToolUseError(ValueError):
    """Tools, a tool choice or tool history that cannot be served (a client error: HTTP 400); `param`
    names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
        self.code: str | None = None


# The request's tool fields as this package reads them (the HTTP schema's classes have these shapes).
class FunctionDeclaration(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str | None: ...
    @property
    def parameters(self) -> dict[str, Any] | None: ...
    @property
    def strict(self) -> bool | None: ...


class ToolDeclaration(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def function(self) -> FunctionDeclaration: ...


class FunctionNamed(Protocol):
    @property
    def name(self) -> str: ...


class NamedChoice(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def function(self) -> FunctionNamed: ...


class AllowedTools(Protocol):
    @property
    def mode(self) -> str: ...
    @property
    def tools(self) -> Sequence[NamedChoice]: ...


class AllowedChoice(Protocol):
    """OpenAI's {"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}: the model may call only
    these of the request's tools, under "auto" or "required", while its prompt shows them all."""

    @property
    def type(self) -> str: ...
    @property
    def allowed_tools(self) -> AllowedTools: ...


class ToolRequest(Protocol):
    @property
    def tools(self) -> Sequence[ToolDeclaration] | None: ...
    @property
    def tool_choice(self) -> Literal["none", "auto", "required"] | NamedChoice | AllowedChoice | None: ...
    @property
    def parallel_tool_calls(self) -> bool | None: ...


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[FunctionTool, ...]
    # "auto" parses the model's own markup; "required" and "named" constrain the output to a call.
    mode: ToolMode
    # The function tool_choice names (mode "named").
    named: str | None
    parallel: bool
    # The functions an allowed_tools choice lets the model call (a strict subset of tools); None: all.
    allowed: frozenset[str] | None = None

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them (transformers' apply_chat_template(tools=...))."""
        return [{"type": "function", "function": _function_dict(tool)} for tool in self.tools]

    @property
    def callable_tools(self) -> tuple[FunctionTool, ...]:
        """The functions the model may call: those an allowed_tools choice names, else all of them (the
        template still sees them all, as OpenAI's prompt does, so the prefix cache keeps serving it)."""
        if self.allowed is None:
            return self.tools
        return tuple(tool for tool in self.tools if tool.name in self.allowed)

    @property
    def has_strict_tools(self) -> bool:
        return any(tool.strict for tool in self.callable_tools)

    @property
    def forced_tools(self) -> tuple[FunctionTool, ...]:
        """The functions a forced choice calls: the one it names, or any it may call (required)."""
        if self.mode == "named":
            return tuple(tool for tool in self.tools if tool.name == self.named)
        return self.callable_tools

    @property
    def max_calls(self) -> int | None:
        """How many calls the output may hold: a named function is called once (OpenAI's "exactly one"),
        and parallel_tool_calls=false allows one."""
        return 1 if self.mode == "named" or not self.parallel else None

    def structured_outputs(self) -> StructuredOutputs | None:
        """The JSON a forced choice is decoded under where the model's family has no grammar of its call
        markup (tools.use): the named function's arguments, or for required an array of calls. The
        arguments' objects are closed to keys they do not declare (tools.closed_schema)."""
        if self.mode == "named":
            [tool] = self.forced_tools
            return StructuredOutputs(json=json.dumps(tool.closed_parameters))
        if self.mode == "required":
            return StructuredOutputs(json=json.dumps(self._required_schema()))
        return None

    def forced_parser(self) -> ToolParser | None:
        if self.mode == "named":
            assert self.named is not None
            return NamedFunctionParser(self.named)
        if self.mode == "required":
            return RequiredCallsParser(self.max_calls)
        return None

    def _required_schema(self) -> dict[str, Any]:
        """A non-empty array of calls, each {"name": <a tool's name>, "parameters": <its arguments>}."""
        return calls_array_schema(self.callable_tools, "parameters", self.max_calls, forced=True)


def tool_plan(request: ToolRequest) -> ToolPlan | None:
    """The request's tool use; None when it has none. 400 for tools or a choice that cannot be served."""
    tools = tuple(_checked_tool(tool, f"tools[{i}]") for i, tool in enumerate(request.tools or ()))
    _check_unique_names(tools)
    choice = request.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise ToolUseError(
                "'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice"
            )
        return None
    parallel = request.parallel_tool_calls is not False
    if choice is None or isinstance(choice, str):
        plan = ToolPlan(tools, choice or "auto", None, parallel)
    elif choice.type == "allowed_tools":
        plan = _allowed_plan(tools, cast(AllowedChoice, choice).allowed_tools, parallel)
    else:
        if choice.type != "function":
            raise ToolUseError(
                "'tool_choice.type' must be 'function' or 'allowed_tools'.", param="tool_choice.type"
            )
        name = cast(NamedChoice, choice).function.name
        if name not in {tool.name for tool in tools}:
            raise ToolUseError(
                f"'tool_choice' names the function '{name}', which is not in 'tools'.", param="tool_choice"
            )
        plan = ToolPlan(tools, "named", name, parallel)
    _check_decoded_schemas(plan)
    return plan


def _allowed_plan(tools: tuple[FunctionTool, ...], allowed: AllowedTools, parallel: bool) -> ToolPlan:
    """An allowed_tools choice: "auto" or "required" over the functions it names."""
    where = "tool_choice.allowed_tools"
    if allowed.mode not in ("auto", "required"):
        raise ToolUseError(f"'{where}.mode' must be 'auto' or 'required'.", param=f"{where}.mode")
    if not allowed.tools:
        raise ToolUseError(f"'{where}.tools' must name at least one function.", param=f"{where}.tools")
    declared = {tool.name for tool in tools}
    names: set[str] = set()
    for i, entry in enumerate(allowed.tools):
        if entry.type != "function":
            raise ToolUseError(
                f"'{where}.tools[{i}].type' must be 'function'.", param=f"{where}.tools[{i}].type"
            )
        name = entry.function.name
        if name not in declared:
            raise ToolUseError(
                f"'{where}.tools[{i}]' names the function '{name}', which is not in 'tools'.",
                param=f"{where}.tools[{i}]",
            )
        names.add(name)
    mode: ToolMode = "auto" if allowed.mode == "auto" else "required"
    return ToolPlan(tools, mode, None, parallel, None if names == declared else frozenset(names))


def _check_decoded_schemas(plan: ToolPlan) -> None:
    """Each function whose arguments are decoded under their schema (forced, or strict): a schema that
    does not compile is the client's error, named by the tool it came from."""
    callable_names = {tool.name for tool in plan.callable_tools}
    for i, tool in enumerate(plan.tools):
        decoded = tool.name in callable_names and (
            plan.mode == "required" or tool.name == plan.named or (plan.mode == "auto" and tool.strict)
        )
        if not decoded or tool.parameters is None:
            continue
        where = f"tools[{i}].function.parameters"
        try:
            # NaN or Infinity would reach the compiler as a syntax error in a text the client never sent.
            schema = json.dumps(tool.closed_parameters, allow_nan=False)
        except ValueError:
            raise ToolUseError(f"{where}: {NON_FINITE_SCHEMA}.", param=where) from None
        try:
            edge_checked_grammar(StructuredOutputs(json=schema))
        except GrammarError as error:
            raise ToolUseError(f"{where}: {error}", param=where) from None


def _checked_tool(tool: ToolDeclaration, where: str) -> FunctionTool:
    if tool.type != "function":
        raise ToolUseError(f"{where}.type must be 'function', got '{tool.type}'.", param=f"{where}.type")
    function = tool.function
    if not FUNCTION_NAME.fullmatch(function.name):
        raise ToolUseError(
            f"{where}.function.name must be 1-64 letters, digits, underscores or dashes, "
            f"got {function.name!r}.",
            param=f"{where}.function.name",
        )
    parameters = function.parameters
    if parameters is not None and parameters.get("type", "object") != "object":
        raise ToolUseError(
            f"{where}.function.parameters must be a JSON schema of an object.",
            param=f"{where}.function.parameters",
        )
    return FunctionTool(function.name, function.description, parameters, bool(function.strict))


def _check_unique_names(tools: tuple[FunctionTool, ...]) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise ToolUseError(
                f"tools[{i}]: the function name '{tool.name}' is used twice.", param=f"tools[{i}]"
            )
        seen.add(tool.name)


def _function_dict(tool: FunctionTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters or NO_PARAMETERS
    return function
