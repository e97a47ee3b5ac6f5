"""What one chat request's tool use changes: the prompt's tools, the sampling parameters (a forced call's
constraint, or under auto the grammar of the calls the model may make; special tokens kept for parsers
that read them) and the parser of the output."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchlm.sampling_params import SamplingParams, StructuredOutputs
from batchlm.structured.backend import GrammarError
from batchlm.structured.spec_grammar import lark_terminal
from batchlm.structured.start_probe import edge_checked_grammar
from batchlm.tools.call_grammar import decoding_hides, json_rule
from batchlm.tools.function_tool import ANY_OBJECT
from batchlm.tools.parser import ToolParser
from batchlm.tools.registry import parser_class
from batchlm.tools.spec import ToolPlan, ToolRequest, ToolUseError, tool_plan

if TYPE_CHECKING:
    from batchlm.reasoning.split import ReasoningParser

# The name of a client's own grammar inside the calls' grammar.
CLIENT_GRAMMAR = "client"


def template_tools(plan: ToolPlan | None) -> list[dict[str, Any]] | None:
    """The tools the chat template is given. As vLLM does by default, tool_choice "none" still shows
    them to the template."""
    return plan.template_tools() if plan is not None else None


def tool_prompt(plan: ToolPlan | None) -> bool:
    """Whether a template without tool support gets the generic tools prompt (not for "none")."""
    return plan is not None and plan.mode != "none"


@dataclass(frozen=True)
class ChatToolUse:
    plan: ToolPlan | None
    # Reads calls out of each choice's output; None: the output is all content.
    parser: ToolParser | None
    # The tokenizer's added tokens by text (call markers may be among them).
    added_tokens: Mapping[str, int] = field(default_factory=dict)
    # What a forced tool_choice decodes under (the family's markup, else plain JSON); None under auto.
    forced: StructuredOutputs | None = None
    # The detokenizer keeps special tokens: the parser reads markers the tokenizer has as special ones.
    keeps_special_tokens: bool = False

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return template_tools(self.plan)

    @property
    def tool_prompt(self) -> bool:
        return tool_prompt(self.plan)

    def sampling_params(
        self,
        params: SamplingParams,
        constraint_field: str = "structured_outputs",
        reasoning: ReasoningParser | None = None,
    ) -> SamplingParams:
        """constraint_field: the request field params.structured_outputs came from (errors name it).
        reasoning: the reply's reasoning parser, whose thinking goes before the constraint unless the
        family's grammar set here holds the thinking itself (gpt-oss's)."""
        params, constrained = self._tool_params(params, constraint_field)
        if reasoning is None:
            return params
        held = constrained and self.parser is not None and self.parser.grammar_holds_thinking
        return reasoning.sampling_params(params, self.added_tokens, thinking_held=held)

    def _tool_params(self, params: SamplingParams, constraint_field: str) -> tuple[SamplingParams, bool]:
        """params for the tool use, and whether their constraint is now the tool use's."""
        forced, constrained = self.forced, True
        if forced is not None:
            # response_format shapes a text reply, which a forced call leaves none of (as in OpenAI's
            # API, where agents send both); an explicit constraint of vLLM's fields conflicts.
            if params.structured_outputs is not None and constraint_field != "response_format":
                raise ToolUseError(
                    f"A forced 'tool_choice' cannot be combined with '{constraint_field}'.",
                    param="tool_choice",
                )
            # The output is then the calls alone, which a stop string could only cut off: stop
            # strings end text, as OpenAI's stop sequences do, and the grammar ends the calls.
            params = params.clone(structured_outputs=forced, stop=[])
        elif (calls := self._auto_calls(params.structured_outputs, constraint_field)) is not None:
            params = params.clone(structured_outputs=calls)
        else:
            constrained = False
        if self.keeps_special_tokens:
            params = params.clone(skip_special_tokens=False)
        return params, constrained

    def _auto_calls(self, own: StructuredOutputs | None, field: str) -> StructuredOutputs | None:
        """With tool_choice "auto", the family's grammar for the calls the model may make: beside free
        text when a function is strict; beside the answer when the client constrained it (JSON from
        response_format, a regex, a choice or a grammar of its own), so that the model may still call
        a tool, as in OpenAI's API. None leaves the client's constraint (or none) as it is: where the
        family has no calls grammar."""
        plan, parser = self.plan, self.parser
        if plan is None or plan.mode != "auto" or parser is None:
            return None
        if own is None:
            answer = None
            # The grammar holds a call to the tools it may make: needed for a strict function's
            # arguments, and for an allowed_tools choice's names.
            if not plan.has_strict_tools and plan.allowed is None:
                return None
        else:
            answer = _answer(own, field)
            if answer is None:
                return None
        grammar = parser.calls_grammar(plan.callable_tools, self.added_tokens, answer)
        if grammar is None:
            return None
        if own is not None and own.grammar is not None:
            return StructuredOutputs(grammar=grammar, subgrammars=((CLIENT_GRAMMAR, own.grammar),))
        return StructuredOutputs(grammar=grammar)


def chat_tool_use(
    request: ToolRequest,
    parser_setting: str,
    chat_template: str | None,
    added_tokens: Mapping[str, int] | None = None,
    hidden_ids: Collection[int] = frozenset(),
) -> ChatToolUse:
    """added_tokens: the tokenizer's added tokens (see ToolParser.calls_grammar). hidden_ids: the ids
    a text decoded without special tokens leaves out."""
    plan = tool_plan(request)
    added = added_tokens or {}
    if plan is None or plan.mode == "none":
        return ChatToolUse(plan, None, added)
    found = parser_class(parser_setting, chat_template)
    family = found(max_calls=plan.max_calls, tools=plan.tools) if found is not None else None
    keeps_special = family is not None and (
        family.keeps_special_tokens or decoding_hides(family.markers, added, hidden_ids)
    )
    if plan.mode != "auto":
        # A forced call in the model's own markup, as its chat template renders calls: in
        # distribution for the model, and the next turn's prompt repeats the tokens it sampled (its
        # cached blocks serve that prompt). Plain JSON where the family has no such grammar.
        grammar = family.forced_grammar(plan.forced_tools, added) if family is not None else None
        if family is not None and grammar is not None:
            return ChatToolUse(plan, family, added, StructuredOutputs(grammar=grammar), keeps_special)
        return ChatToolUse(plan, plan.forced_parser(), added, plan.structured_outputs())
    if family is None:
        raise ToolUseError(
            "tool_choice 'auto' needs a tool-call parser, and this server runs with --tool-call-parser none; "
            "send tool_choice 'required', a named function or 'none'.",
            param="tool_choice",
        )
    return ChatToolUse(plan, family, added, keeps_special_tokens=keeps_special)


def _answer(own: StructuredOutputs, field: str) -> str | None:
    """The client's constraint as a Lark rule body: JSON as `%json`, a regex or choice as a terminal,
    its own grammar by reference (`@client`, a sub-grammar of the calls' grammar). A constraint that
    does not compile is the client's error, named by its field."""
    if not own.json_object:
        try:
            edge_checked_grammar(own)
        except GrammarError as error:
            raise ToolUseError(f"Invalid '{field}': {error}", param=field) from None
    if own.grammar is not None:
        return f"@{CLIENT_GRAMMAR}"
    terminal = lark_terminal(own)
    if terminal is not None:
        return terminal
    if own.json_object:
        schema: object = dict(ANY_OBJECT)
    else:
        assert own.json is not None
        schema = json.loads(own.json)
    if not isinstance(schema, dict):
        return None
    # The calls' format, also over the client's own: llguidance reads an answer and a call that both
    # open with `{` (Llama 3's markup) as one JSON only when their formats are the same.
    return json_rule(schema)
