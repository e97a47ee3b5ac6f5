"""What one chat request's tool use changes: the prompt's tools, the sampling parameters (a forced call's
constraint; special tokens kept for parsers that read them) and the parser of the output."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchlm.sampling_params import SamplingParams, StructuredOutputs
from batchlm.tools.parser import ToolParser
from batchlm.tools.registry import parser_class
from batchlm.tools.spec import ToolPlan, ToolRequest, ToolUseError, tool_plan


@dataclass(frozen=True)
class ChatToolUse:
    plan: ToolPlan | None
    # Reads calls out of each choice's output; None: the output is all content.
    parser: ToolParser | None
    # The tokenizer's added tokens by text (call markers may be among them).
    added_tokens: Mapping[str, int] = field(default_factory=dict)

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        # As vLLM does by default, tool_choice "none" still shows the tools to the template.
        return self.plan.template_tools() if self.plan is not None else None

    @property
    def tool_prompt(self) -> bool:
        """Whether a template without tool support gets the generic tools prompt (not for "none")."""
        return self.plan is not None and self.plan.mode != "none"

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        forced = self.plan.structured_outputs() if self.plan is not None else None
        if forced is not None:
            if params.structured_outputs is not None:
                raise ToolUseError(
                    "A forced 'tool_choice' cannot be combined with another output constraint "
                    "('response_format' or 'structured_outputs').",
                    param="tool_choice",
                )
            params = params.clone(structured_outputs=forced)
        elif params.structured_outputs is None and (calls := self._strict_calls()) is not None:
            params = params.clone(structured_outputs=calls)
        if self.parser is not None and self.parser.keeps_special_tokens:
            params = params.clone(skip_special_tokens=False)
        return params

    def _strict_calls(self) -> StructuredOutputs | None:
        """With tool_choice "auto" and a strict function among the tools: the family's grammar that
        leaves text free and holds every call to the tools (a strict one's arguments to its schema).
        None where the family's markup has no such grammar."""
        plan, parser = self.plan, self.parser
        if plan is None or plan.mode != "auto" or not plan.has_strict_tools or parser is None:
            return None
        grammar = parser.calls_grammar(plan.tools, self.added_tokens)
        return StructuredOutputs(grammar=grammar) if grammar is not None else None


def chat_tool_use(
    request: ToolRequest,
    parser_setting: str,
    chat_template: str | None,
    added_tokens: Mapping[str, int] | None = None,
) -> ChatToolUse:
    """added_tokens: the tokenizer's added tokens (see ToolParser.calls_grammar)."""
    plan = tool_plan(request)
    if plan is None or plan.mode == "none":
        return ChatToolUse(plan, None)
    forced = plan.forced_parser()
    if forced is not None:
        return ChatToolUse(plan, forced)
    found = parser_class(parser_setting, chat_template)
    if found is None:
        raise ToolUseError(
            "tool_choice 'auto' needs a tool-call parser, and this server runs with --tool-call-parser none; "
            "send tool_choice 'required', a named function or 'none'.",
            param="tool_choice",
        )
    return ChatToolUse(plan, found(max_calls=None if plan.parallel else 1), added_tokens or {})
