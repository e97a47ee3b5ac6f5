"""What one chat request's tool use changes: the prompt's tools, the sampling parameters (a forced call's
constraint; special tokens kept for parsers that read them) and the parser of the output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchlm.outputs import FinishReason
from batchlm.sampling_params import SamplingParams
from batchlm.server.errors import APIError
from batchlm.server.protocol import ChatCompletionRequest
from batchlm.server.responses import ResponseFunctionCall, ResponseToolCall
from batchlm.server.tools.calls import ToolCall, ToolCallDelta
from batchlm.server.tools.parser import ToolParser
from batchlm.server.tools.registry import parser_class
from batchlm.server.tools.spec import ToolPlan, tool_plan


@dataclass(frozen=True)
class ChatToolUse:
    plan: ToolPlan | None
    # Reads calls out of each choice's output; None: the output is all content.
    parser: ToolParser | None

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        # As vLLM does by default, tool_choice "none" still shows the tools to the template.
        return self.plan.template_tools() if self.plan is not None else None

    @property
    def tool_prompt(self) -> bool:
        """Whether a template without tool support gets the generic tools prompt (not for "none")."""
        return self.plan is not None and self.plan.mode != "none"

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        constraint = self.plan.structured_outputs() if self.plan is not None else None
        if constraint is not None:
            if params.structured_outputs is not None:
                raise APIError(
                    400,
                    "A forced 'tool_choice' cannot be combined with another output constraint "
                    "('response_format' or 'structured_outputs').",
                    param="tool_choice",
                )
            params = params.clone(structured_outputs=constraint)
        if self.parser is not None and self.parser.keeps_special_tokens:
            params = params.clone(skip_special_tokens=False)
        return params


def chat_tool_use(
    request: ChatCompletionRequest, parser_setting: str, chat_template: str | None
) -> ChatToolUse:
    plan = tool_plan(request)
    if plan is None or plan.mode == "none":
        return ChatToolUse(plan, None)
    forced = plan.forced_parser()
    if forced is not None:
        return ChatToolUse(plan, forced)
    found = parser_class(parser_setting, chat_template)
    if found is None:
        raise APIError(
            400,
            "tool_choice 'auto' needs a tool-call parser, and this server runs with --tool-call-parser none; "
            "send tool_choice 'required', a named function or 'none'.",
            param="tool_choice",
        )
    return ChatToolUse(plan, found(max_calls=None if plan.parallel else 1))


def response_tool_calls(calls: tuple[ToolCall, ...]) -> list[ResponseToolCall] | None:
    if not calls:
        return None
    return [
        ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]


def delta_tool_call(delta: ToolCallDelta) -> dict[str, Any]:
    """One streamed call piece as OpenAI sends it: index, id, type and name first; then arguments."""
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    function = {"name": delta.name, "arguments": delta.arguments}
    return {"index": delta.index, "id": delta.id, "type": "function", "function": function}


def finish_reason(reason: FinishReason | None, called: bool) -> str | None:
    """The finish_reason a chat response sends: a completion that ended on its own after calling tools
    finishes with "tool_calls"."""
    if reason is None:
        return None
    return "tool_calls" if called and reason == FinishReason.STOP else FinishReason(reason).value
