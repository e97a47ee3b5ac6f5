"""gpt-oss's grammars in harmony markup (tools/harmony_grammar.py), compiled by llguidance against the
tiny tokenizer with harmony's markers added as special tokens and `<|return|>` and `<|call|>` among the
stop tokens, as gpt-oss's are: the outputs gpt-oss writes are taken (thinking, preambles, the final
message or one call, its header either way round), calls of tools not offered, arguments a strict
schema refuses and markers spelled out in text are not. The outputs read back through the parsers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from batchlm.reasoning.harmony import HarmonyReasoningParser
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import allowed_tokens
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.tools.call_grammar import json_rule
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.gpt_oss import GptOssParser
from batchlm.tools.harmony import CALL, MARKERS, RETURN

A_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
STRICT = FunctionTool("f", None, A_SCHEMA, True)
LOOSE = FunctionTool("g", None, {"type": "object"}, False)
ANALYSIS = "<|channel|>analysis<|message|>I should call f.<|end|><|start|>assistant"
PREAMBLE = "<|channel|>commentary<|message|>Let me look.<|end|><|start|>assistant"
FINAL = "<|channel|>final<|message|>It is 1."
# The header as gpt-oss writes it, and as its template renders a call in history.
WRITTEN = "<|channel|>commentary to=functions.{} <|constrain|>json<|message|>{}<|call|>"
RENDERED = " to=functions.{}<|channel|>commentary json<|message|>{}<|call|>"


class HarmonyGrammar:
    def __init__(self, tiny_tokenizer, grammar_of) -> None:
        """grammar_of: the grammar, given the added tokens."""
        self.hf = copy.deepcopy(tiny_tokenizer.hf)
        self.hf.add_tokens(list(MARKERS), special_tokens=True)
        self.added = {m: self.hf.convert_tokens_to_ids(m) for m in MARKERS}
        self.stops = {1, self.added[RETURN], self.added[CALL]}
        self.backend = LLGuidanceBackend.from_hf(self.hf, len(self.hf), sorted(self.stops))
        self.spec = StructuredOutputs(grammar=grammar_of(self.added))

    def allowed_after(self, text: str, spelled: str = "") -> set[int] | None:
        """What may follow `text` (its tokens, markers as their own) and then `spelled` (text in which a
        marker is spelled out in plain tokens); None where a token is refused."""
        ids = self.hf.encode(text, add_special_tokens=False)
        for char in spelled:  # a character at a time: the tokenizer cannot match a marker
            ids += self.hf.encode(char, add_special_tokens=False)
        matcher = self.backend.matcher(self.spec)
        if not all(matcher.accept(t) for t in ids):
            return None
        row = np.empty(self.backend.bitmask_words, dtype=np.int32)
        matcher.fill_bitmask(row)
        return set(allowed_tokens(row, len(self.hf)).tolist())

    def takes_whole(self, text: str) -> bool:
        """Whether `text` is a whole output: taken, and then the generation may end."""
        allowed = self.allowed_after(text)
        return allowed is not None and bool(allowed & self.stops)

    def takes(self, text: str, spelled: str = "") -> bool:
        return self.allowed_after(text, spelled) is not None


@pytest.fixture(scope="module")
def auto(tiny_tokenizer) -> HarmonyGrammar:
    return HarmonyGrammar(tiny_tokenizer, lambda added: GptOssParser().calls_grammar([STRICT, LOOSE], added))


def test_the_outputs_gpt_oss_writes_are_taken(auto: HarmonyGrammar) -> None:
    assert auto.takes_whole(FINAL)
    assert auto.takes_whole(ANALYSIS + ANALYSIS + FINAL)
    assert auto.takes_whole(ANALYSIS + "<|channel|>final<|message|>")
    for header in (WRITTEN, RENDERED):
        assert auto.takes_whole(ANALYSIS + PREAMBLE + header.format("f", '{"a": 1}'))
        assert auto.takes_whole(header.format("g", '{"any": [1, "x"]}'))
    assert auto.takes_whole(ANALYSIS + '<|channel|>commentary to=functions.f<|message|>{"a":1}<|call|>')


def test_a_call_ends_with_its_terminator_and_the_output_with_it(auto: HarmonyGrammar) -> None:
    opened = ANALYSIS + WRITTEN.format("f", '{"a": 1}').removesuffix(CALL)
    assert auto.allowed_after(opened) == {auto.added[CALL]}
    # `<|call|>` stops the generation: nothing but a stop token may follow it.
    assert auto.allowed_after(opened + CALL) <= auto.stops
    # A message the thinking opened must end before anything else does.
    assert not auto.allowed_after("<|channel|>analysis<|message|>Hm") & auto.stops


def test_calls_outside_the_tools_or_their_strict_schema_are_refused(auto: HarmonyGrammar) -> None:
    assert auto.takes(ANALYSIS + WRITTEN.format("f", '{"a": 1').removesuffix(CALL))
    assert not auto.takes(ANALYSIS + WRITTEN.format("f", '{"a": 1, "zz"'))
    assert not auto.takes(WRITTEN.format("f", '{"a": "one"'))
    assert not auto.takes(RENDERED.format("launch", "{"))
    assert not auto.takes(WRITTEN.format("launch", "{"))
    # A call is a harmony message: not JSON in the final message, nor a call to another recipient.
    assert not auto.takes("<|channel|>commentary to=browser.search <|constrain|>json<|message|>{")


def test_a_body_may_not_spell_a_marker_out(auto: HarmonyGrammar) -> None:
    """The parsers read the text, where a spelled-out marker reads as the token: a call of a tool not
    offered could slip in as thinking."""
    analysis, final = "<|channel|>analysis<|message|>", "<|channel|>final<|message|>"
    assert auto.takes(analysis, "Hm <|start")
    for marker in MARKERS:
        assert not auto.takes(analysis, f"Hm {marker}"), marker
        assert not auto.takes(final, f"Done{marker}"), marker
    assert auto.takes_whole(final + "a <| b |> c")


def test_names_that_begin_other_names_are_told_apart(tiny_tokenizer) -> None:
    tools = [FunctionTool(name, None, A_SCHEMA, True) for name in ("get", "get_weather")]
    grammar = HarmonyGrammar(tiny_tokenizer, lambda added: GptOssParser().calls_grammar(tools, added))
    for name in ("get", "get_weather"):
        assert grammar.takes_whole(WRITTEN.format(name, '{"a": 2}'))
        assert grammar.takes_whole(RENDERED.format(name, '{"a": 2}'))
    assert not grammar.takes(WRITTEN.format("get_w", "{"))


def test_an_answer_beside_the_tools_is_the_final_message_s_body(tiny_tokenizer) -> None:
    answer = json_rule({"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]})
    grammar = HarmonyGrammar(
        tiny_tokenizer, lambda added: GptOssParser().calls_grammar([STRICT], added, answer)
    )
    assert grammar.takes_whole(ANALYSIS + '<|channel|>final<|message|>{"b": "x"}')
    assert not grammar.takes(ANALYSIS + "<|channel|>final<|message|>It is")
    assert grammar.takes_whole(ANALYSIS + WRITTEN.format("f", '{"a": 1}'))
    # A preamble is content, which must be the answer alone.
    assert not grammar.takes(PREAMBLE)


@pytest.mark.parametrize("header", [WRITTEN, RENDERED])
def test_a_forced_call_follows_the_thinking_in_harmony_markup(tiny_tokenizer, header: str) -> None:
    grammar = HarmonyGrammar(tiny_tokenizer, lambda added: GptOssParser().forced_grammar([STRICT], added))
    output = ANALYSIS + header.format("f", '{"a": 1}')
    assert grammar.takes_whole(output)
    assert grammar.takes_whole(header.format("f", '{"a": 1}'))
    assert not grammar.takes(FINAL), "no final message"
    assert not grammar.takes(PREAMBLE), "no preamble"
    # Laid out as the template renders the arguments (tojson's separators), the schema closed.
    assert not grammar.takes(header.format("f", '{"a":1').removesuffix(CALL))
    assert not grammar.takes(header.format("f", '{"a": 1, "zz"'))
    # As the server reads it: the thinking, and the call.
    split = HarmonyReasoningParser().split(output.removesuffix(CALL), final=True)
    assert split.reasoning == "I should call f."
    [call] = GptOssParser().extract(split.content).tool_calls
    assert (call.name, json.loads(call.arguments)) == ("f", {"a": 1})
