"""A reasoning model's thinking split from its answer: whole outputs and streams at every split point,
beside tool calls, the parser `auto` picks from a chat template, and the grammar under which a
constraint holds from the end of the thinking on."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from batchlm.reasoning.message import MessageReader
from batchlm.reasoning.registry import MISTRAL_THINK, SEED_THINK, reasoning_markers, reasoning_parser
from batchlm.reasoning.split import ReasoningParser, ThinkMarkers, prompt_opens_thinking
from batchlm.sampling_params import SamplingParams, StructuredOutputs
from batchlm.structured.backend import allowed_tokens
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.hermes import HermesParser
from grammar_walk import EOS

THINK = ThinkMarkers("<think>", "</think>")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

# (opened by the prompt, output, reasoning, content)
CASES = [
    (
        False,
        "<think>\nThe user asks.\nParis.\n</think>\n\nIt is Paris.",
        "The user asks.\nParis.",
        "It is Paris.",
    ),
    (True, "The user asks.\n</think>\n\nIt is Paris.", "The user asks.", "It is Paris."),
    (False, "It is Paris.", None, "It is Paris."),
    (
        False,
        "\n<think>a < b, </thinking> is no marker</think>Yes.",
        "a < b, </thinking> is no marker",
        "Yes.",
    ),
    (False, "<thing> is text", None, "<thing> is text"),
    (False, "Not at the start: <think>x</think>", None, "Not at the start: <think>x</think>"),
    (False, "<think></think>\n\n", "", ""),
    (True, "Only thinking, cut off by max_tokens </thi", "Only thinking, cut off by max_tokens </thi", ""),
]
# Seed-OSS's thinking: budget reflections inside it are thinking; under a budget of 0 the prompt opens
# the block and a reflection, which the model closes before the block.
REFLECTION = (
    "<seed:cot_budget_reflect>I have used 9 tokens, and there are 503 left.</seed:cot_budget_reflect>"
)
SEED_CASES = [
    (
        False,
        f"<seed:think>The user asks.\n{REFLECTION}\nParis.</seed:think>\nIt is Paris.",
        f"The user asks.\n{REFLECTION}\nParis.",
        "It is Paris.",
    ),
    (
        True,
        "The budget is 0, so I answer.</seed:cot_budget_reflect>\n</seed:think>It is Paris.",
        "The budget is 0, so I answer.</seed:cot_budget_reflect>",
        "It is Paris.",
    ),
    (False, "<think>Not Seed's</think>Yes.", None, "<think>Not Seed's</think>Yes."),
    (False, "<seed:think>Cut off </seed:thi", "Cut off </seed:thi", ""),
]
ALL_CASES = [(THINK, *case) for case in CASES] + [(SEED_THINK, *case) for case in SEED_CASES]


@pytest.mark.parametrize(("markers", "opened", "output", "reasoning", "content"), ALL_CASES)
def test_split_and_its_stream_at_every_split_point(
    markers: ThinkMarkers, opened: bool, output: str, reasoning: str | None, content: str
) -> None:
    parser = ReasoningParser(markers, opened)
    split = parser.split(output, final=True)
    assert (split.reasoning, split.content) == (reasoning, content)
    for at in range(len(output) + 1):
        stream = parser.stream()
        pieces = [stream.feed(output[:at]), stream.feed(output[at:]), stream.finish()]
        assert "".join(p.reasoning for p in pieces) == (reasoning or ""), at
        assert "".join(p.content for p in pieces) == content, at


@pytest.mark.parametrize(("markers", "opened", "output", "reasoning", "content"), ALL_CASES)
def test_the_thinking_tokens_end_with_the_token_that_closes_the_block(
    markers: ThinkMarkers, opened: bool, output: str, reasoning: str | None, content: str
) -> None:
    pieces, position = [], 0
    while position < len(output):  # tokens of 1-3 characters, so that markers span tokens
        size = 1 + len(pieces) % 3
        pieces.append(output[position : position + size])
        position += size
    parser = ReasoningParser(markers, opened_by_prompt=opened)
    counted = parser.thinking_tokens(list(range(len(pieces))), lambda ids: "".join(pieces[i] for i in ids))
    if reasoning is None:
        assert counted == 0
    elif markers.end in output:
        # The counted tokens spell the end marker out; one fewer does not.
        assert markers.end in "".join(pieces[:counted])
        assert markers.end not in "".join(pieces[: counted - 1])
    else:  # cut short inside the block: every token is thinking
        assert counted == len(pieces)


def test_a_stream_holds_back_what_may_be_a_marker() -> None:
    stream = ReasoningParser(THINK).stream()
    assert stream.feed("<thi").content == "" and stream.feed("nk>").reasoning == ""
    assert stream.feed("Hm. </thi").reasoning == "Hm."
    assert stream.feed("nk> ").reasoning == "" and stream.feed("Answer").content == "Answer"
    stream = ReasoningParser(THINK).stream()
    assert stream.feed("<thi").content == "" and stream.feed("s is text").content == "<this is text"


def test_markers_as_a_mistral_model_writes_them() -> None:
    split = ReasoningParser(ThinkMarkers("[THINK]", "[/THINK]", True)).split(
        "[THINK]plan[/THINK]Done.", final=True
    )
    assert (split.reasoning, split.content) == ("plan", "Done.")


def test_thinking_then_calls_at_every_split_point() -> None:
    reader = MessageReader(ReasoningParser(THINK), HermesParser())
    output = f"<think>\nI should call get_weather. <tool_call> is how.\n</think>\n\nLet me look.\n{CALL}"
    message = reader.read(output)
    assert message.reasoning == "I should call get_weather. <tool_call> is how."
    assert message.content == "Let me look."
    assert [(c.name, c.arguments) for c in message.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    for at in range(len(output) + 1):
        stream = reader.stream()
        pieces = [stream.feed(output[:at]), stream.feed(output[at:]), stream.finish()]
        assert "".join(p.reasoning for p in pieces) == message.reasoning, at
        assert "".join(p.content for p in pieces) == message.content, at
        assert [c.name for p in pieces for c in p.tool_calls if c.name] == ["get_weather"], at
        assert stream.ends_in_calls


def test_a_message_of_thinking_alone_has_no_content() -> None:
    message = MessageReader(ReasoningParser(THINK, True), None).read("Thinking on and on", cut_short=True)
    assert (message.reasoning, message.content) == ("Thinking on and on", None)
    plain = MessageReader(ReasoningParser(THINK), None).read("")
    assert (plain.reasoning, plain.content) == (None, "")


@pytest.mark.parametrize(
    ("setting", "template", "markers"),
    [
        ("auto", "{{ message.content.split('</think>')[-1] }}<|im_start|>assistant\n", THINK),
        ("auto", "[THINK]{{ thinking }}[/THINK]", ThinkMarkers("[THINK]", "[/THINK]", special=True)),
        ("auto", "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", None),
        ("auto", None, None),
        ("none", "</think>", None),
        ("qwen3", None, THINK),
        ("deepseek_r1", None, THINK),
        # Seed-OSS's template names its markers in variables; `</seed:think>` holds no `</think>`.
        ("auto", "{%- set think_end_token = '</seed:think>' -%}{{ think_end_token }}", SEED_THINK),
        ("auto", "<seed:think>{{ m.reasoning_content }}</seed:think> or <think></think>", SEED_THINK),
        (
            "seed_oss",
            None,
            ThinkMarkers("<seed:think>", "</seed:think>", False, ("<seed:cot_budget_reflect>",)),
        ),
    ],
)
def test_the_parser_a_setting_picks(setting: str, template: str | None, markers: ThinkMarkers | None) -> None:
    assert reasoning_markers(setting, template) == markers


def test_the_prompt_says_whether_thinking_is_open() -> None:
    assert prompt_opens_thinking("<|Assistant|><think>\n", THINK)
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n", THINK)
    assert not prompt_opens_thinking("<|im_start|>assistant\n", THINK)
    # The assistant message a request continues opens a block it leaves open, beyond the prompt's
    # last tokens; one it closes, or one that never opens, leaves the model answering.
    tail = " see what the user wants: the"
    assert prompt_opens_thinking(tail, THINK, continued=f"<think>\nLet me{tail}")
    assert not prompt_opens_thinking(tail, THINK, continued=f"<think>\n\n</think>\n\nLet me{tail}")
    assert not prompt_opens_thinking(tail, THINK, continued=f"Let me{tail}")
    assert prompt_opens_thinking(" the", MISTRAL_THINK, continued="[THINK]Hm, the")
    opened = reasoning_parser("auto", "</think>", lambda: "assistant\n<think>\n")
    assert opened is not None and opened.opened_by_prompt
    assert reasoning_parser("none", "</think>", lambda: pytest.fail("the prompt is not read")) is None


def test_seed_s_prompt_opens_thinking_with_a_budget_reflection_in_it() -> None:
    """Seed-OSS's template opens the block and a budget reflection in it under a thinking budget of 0;
    otherwise its generation prompt opens nothing, and the model writes `<seed:think>` itself."""
    assert prompt_opens_thinking("<seed:bos>assistant\n<seed:think><seed:cot_budget_reflect>", SEED_THINK)
    assert prompt_opens_thinking("<seed:bos>assistant\n<seed:think>", SEED_THINK)
    assert not prompt_opens_thinking("<seed:bos>assistant\n", SEED_THINK)
    assert not prompt_opens_thinking(
        "<seed:think><seed:cot_budget_reflect>x</seed:cot_budget_reflect>", SEED_THINK
    )
    assert not prompt_opens_thinking("<think><seed:cot_budget_reflect>", THINK), "Seed's tag alone"


ADDED = {"<seed:think>": 7, "</seed:think>": 8, "<seed:cot_budget_reflect>": 9, "<think>": 10, "</think>": 11}


@pytest.mark.parametrize(
    ("setting", "hidden", "kept"),
    [
        ("seed_oss", {0, 7, 8, 9}, True),  # special tokens of the tokenizer: hidden, then kept
        ("seed_oss", {0, 9, 10, 11}, False),  # added tokens the text shows: special tokens stay hidden
        ("think", {0, 7, 8, 9}, False),
        ("think", {0, 11}, True),
        ("mistral", set(), True),  # control tokens, kept whatever the tokenizer says
    ],
)
def test_special_tokens_are_kept_where_the_tokenizer_would_hide_a_marker(
    setting: str, hidden: set[int], kept: bool
) -> None:
    parser = reasoning_parser(setting, None, lambda: "", None, ADDED, lambda: hidden)
    assert parser is not None and parser.keeps_special_tokens == kept
    assert parser.sampling_params(SamplingParams(), ADDED).skip_special_tokens == (not kept)


def test_markers_the_tokenizer_lacks_leave_its_hidden_ids_unread() -> None:
    parser = reasoning_parser("seed_oss", None, lambda: "", None, {}, lambda: pytest.fail("not read"))
    assert parser is not None and not parser.keeps_special_tokens


@pytest.fixture(scope="module")
def thinking_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with Qwen3's thinking markers as added tokens."""
    hf = copy.deepcopy(tiny_tokenizer.hf)
    hf.add_tokens(["<think>", "</think>"])
    return hf


class Walk:
    """One matcher of `spec` over a tokenizer with the markers as tokens, fed text and tokens."""

    def __init__(self, hf, spec: StructuredOutputs, markers: ThinkMarkers = THINK) -> None:
        self.hf, self.vocab = hf, len(hf)
        backend = LLGuidanceBackend.from_hf(hf, self.vocab, EOS)
        self.matcher = backend.matcher(spec)
        self.row = np.empty(backend.bitmask_words, dtype=np.int32)
        self.think, self.end = hf.convert_tokens_to_ids([markers.start, markers.end])

    def allowed(self) -> set[int]:
        self.matcher.fill_bitmask(self.row)
        return set(allowed_tokens(self.row, self.vocab).tolist())

    def feed(self, text: str) -> bool:
        return all(self.matcher.accept(t) for t in self.hf.encode(text, add_special_tokens=False))


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def constrained(opened: bool, hf) -> StructuredOutputs:
    added = {"<think>": hf.convert_tokens_to_ids("<think>"), "</think>": hf.convert_tokens_to_ids("</think>")}
    params = SamplingParams(structured_outputs=StructuredOutputs(json=json.dumps(SCHEMA)))
    spec = ReasoningParser(THINK, opened).sampling_params(params, added).structured_outputs
    assert spec is not None and spec.preamble is not None
    return spec


def test_a_schema_holds_after_the_thinking_the_model_opens(thinking_tokenizer) -> None:
    walk = Walk(thinking_tokenizer, constrained(False, thinking_tokenizer))
    assert walk.think in walk.allowed() and walk.matcher.accept(walk.think)
    # Inside the block any text goes, JSON-looking or not, but not the end marker spelled out.
    assert walk.feed("I need {a: 1}, so") and not set(EOS) & walk.allowed()
    pieces = [
        *walk.hf.encode("</thi", add_special_tokens=False),
        *walk.hf.encode("nk>", add_special_tokens=False),
    ]
    assert walk.end not in pieces and not all(walk.matcher.accept(t) for t in pieces)
    walk = Walk(thinking_tokenizer, constrained(False, thinking_tokenizer))
    assert walk.matcher.accept(walk.think) and walk.feed("plan") and walk.matcher.accept(walk.end)
    assert walk.feed("\n\n") and not walk.feed("Sure")
    walk = Walk(thinking_tokenizer, constrained(False, thinking_tokenizer))
    assert walk.matcher.accept(walk.think) and walk.feed("plan") and walk.matcher.accept(walk.end)
    assert walk.feed('\n{"a":1}') and set(EOS) <= walk.allowed()


def test_without_thinking_the_schema_holds_from_the_first_token(thinking_tokenizer) -> None:
    walk = Walk(thinking_tokenizer, constrained(False, thinking_tokenizer))
    assert walk.end not in walk.allowed() and not walk.feed("Sure")
    walk = Walk(thinking_tokenizer, constrained(False, thinking_tokenizer))
    assert walk.feed('{"a":2}') and set(EOS) <= walk.allowed()


def test_a_block_the_prompt_opened_must_close_before_the_answer(thinking_tokenizer) -> None:
    walk = Walk(thinking_tokenizer, constrained(True, thinking_tokenizer))
    assert walk.think not in walk.allowed() and walk.end in walk.allowed()
    assert walk.feed('{"a": 1}') and not set(EOS) & walk.allowed(), "JSON here is still thinking"
    assert walk.matcher.accept(walk.end) and walk.feed('{"a":1}') and set(EOS) <= walk.allowed()


def test_a_schema_holds_after_seed_s_thinking_its_budget_reflection_closed_in_it(tiny_tokenizer) -> None:
    """Under a thinking budget of 0 Seed-OSS closes the reflection its prompt opened inside the block:
    the tokenizer's other tokens stay free in the thinking, and the schema holds after it."""
    hf = copy.deepcopy(tiny_tokenizer.hf)
    tokens = ["<seed:think>", "</seed:think>", "<seed:cot_budget_reflect>", "</seed:cot_budget_reflect>"]
    hf.add_tokens(tokens, special_tokens=True)
    added = {token: hf.convert_tokens_to_ids(token) for token in tokens}
    params = SamplingParams(structured_outputs=StructuredOutputs(json=json.dumps(SCHEMA)))
    spec = ReasoningParser(SEED_THINK, True).sampling_params(params, added).structured_outputs
    assert spec is not None
    walk = Walk(hf, spec, SEED_THINK)
    assert walk.think not in walk.allowed() and walk.feed("The budget is 0.")
    assert walk.matcher.accept(added["</seed:cot_budget_reflect>"]) and walk.feed("\n")
    assert not set(EOS) & walk.allowed() and walk.matcher.accept(walk.end)
    assert walk.feed('{"a":1}') and set(EOS) <= walk.allowed()


def test_no_constraint_gets_no_grammar() -> None:
    params = SamplingParams()
    assert ReasoningParser(THINK).sampling_params(params, {}) is params


def test_special_markers_are_kept_in_the_text() -> None:
    mistral = reasoning_markers("mistral", None)
    assert mistral is not None and mistral.special
    assert not ReasoningParser(mistral).sampling_params(SamplingParams(), {}).skip_special_tokens
    assert ReasoningParser(THINK).sampling_params(SamplingParams(), {}).skip_special_tokens


def test_strict_calls_hold_after_the_thinking(thinking_tokenizer) -> None:
    hf = thinking_tokenizer
    added = {"<think>": hf.convert_tokens_to_ids("<think>"), "</think>": hf.convert_tokens_to_ids("</think>")}
    strict = FunctionTool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}}, True)
    calls = StructuredOutputs(grammar=HermesParser().calls_grammar([strict], added))
    params = ReasoningParser(THINK).sampling_params(SamplingParams(structured_outputs=calls), added)
    assert params.structured_outputs is not None

    def walk() -> Walk:
        walked = Walk(hf, params.structured_outputs)
        assert walked.matcher.accept(walked.think) and walked.feed("I will call f.")
        assert walked.matcher.accept(walked.end) and walked.feed("\n\nSure. ")
        return walked

    assert walk().feed('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')
    assert not walk().feed('<tool_call>{"name": "g", "arguments": {}}</tool_call>'), "only the tools"


def test_a_grammar_with_sub_grammars_holds_after_the_thinking(thinking_tokenizer) -> None:
    """A tool-call grammar that holds a client's own grammar by reference keeps it after a preamble."""
    hf = thinking_tokenizer
    added = {"<think>": hf.convert_tokens_to_ids("<think>"), "</think>": hf.convert_tokens_to_ids("</think>")}
    own = StructuredOutputs(
        grammar='start: "yes" | "no" | @client', subgrammars=(("client", 'start: "maybe"'),)
    )
    spec = ReasoningParser(THINK, False).sampling_params(SamplingParams(structured_outputs=own), added)
    assert spec.structured_outputs is not None and spec.structured_outputs.subgrammars == own.subgrammars
    for answer, taken in [("maybe", True), ("no", True), ("perhaps", False)]:
        walk = Walk(hf, spec.structured_outputs)
        assert walk.matcher.accept(walk.think) and walk.feed("hmm") and walk.matcher.accept(walk.end)
        assert (walk.feed(answer) and set(EOS) <= walk.allowed()) is taken
