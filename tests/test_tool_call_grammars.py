"""Tool calls decoded under grammars: a forced call's closed arguments, and each parser family's grammar
for the calls a model may make under tool_choice auto (strict functions, or beside a JSON answer),
walked over the tiny tokenizer."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import allowed_tokens
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.tools.closed_schema import closed_objects
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.granite import MARKER as GRANITE_MARKER
from batchlm.tools.granite import GraniteParser
from batchlm.tools.hermes import END, START, HermesParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser
from batchlm.tools.registry import PARSERS
from batchlm.tools.seed_oss import SeedOssParser
from grammar_walk import EOS, greedy_walk, takes, tiny_backend


@pytest.fixture(scope="module")
def backend(tiny_tokenizer) -> LLGuidanceBackend:
    return tiny_backend(tiny_tokenizer)


def test_a_forced_call_from_an_open_parameters_schema_writes_only_declared_keys(
    backend, tiny_tokenizer
) -> None:
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    wanted = '{"a":1,"zz":2}'
    open_text = greedy_walk(backend, StructuredOutputs(json=json.dumps(parameters)), tiny_tokenizer, wanted)
    assert json.loads(open_text) == {"a": 1, "zz": 2}, "the open schema takes the extra key"
    spec = StructuredOutputs(json=json.dumps(closed_objects(parameters)))
    # Once "zz" cannot follow, the walk takes the lowest allowed ids: digits, then the object's end.
    assert set(json.loads(greedy_walk(backend, spec, tiny_tokenizer, wanted))) == {"a"}


def test_a_strict_function_s_calls_in_free_text_are_held_to_the_tools(backend, tiny_tokenizer) -> None:
    strict = FunctionTool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}}, True)
    free = FunctionTool("g", None, {"type": "object"}, False)
    spec = StructuredOutputs(grammar=HermesParser().calls_grammar([strict, free], {}))

    def walk(prefer: str) -> str:
        return greedy_walk(backend, spec, tiny_tokenizer, prefer)

    assert walk("no call at all") == "no call at all"
    allowed = 'Ok <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call> then <tool_call>{"name": "g", "arguments": {"any": 2}}</tool_call> done'
    assert walk(allowed) == allowed
    # An undeclared key in a strict function's arguments, or a function not offered: the walk leaves
    # the wanted text where the grammar refuses it.
    extra = walk('<tool_call>{"name": "f", "arguments": {"a": 1, "zz": 2}}</tool_call>')
    assert extra.startswith('<tool_call>{"name": "f", "arguments": {"a": 1') and '"zz"' not in extra
    unknown = walk('<tool_call>{"name": "launch", "arguments": {}}</tool_call>')
    assert '"launch"' not in unknown
    assert HermesParser().scan(extra, final=True).calls[0].name == "f"


def test_strict_calls_where_the_markers_are_tokens_of_their_own(tiny_tokenizer) -> None:
    hf = copy.deepcopy(tiny_tokenizer.hf)
    # Added, not special: the detokenized text keeps them (Qwen's kind, reasoning tokens included).
    hf.add_tokens([START, END, "<think>", "</think>"])
    added = {token: hf.convert_tokens_to_ids(token) for token in (START, END, "<think>", "</think>")}
    start, end, think = added[START], added[END], added["<think>"]
    vocab = len(hf)
    backend = LLGuidanceBackend.from_hf(hf, vocab, EOS)
    strict = FunctionTool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}}, True)
    spec = StructuredOutputs(grammar=HermesParser().calls_grammar([strict], added))
    matcher = backend.matcher(spec)
    row = np.empty(backend.bitmask_words, dtype=np.int32)

    def allowed() -> set[int]:
        matcher.fill_bitmask(row)
        return set(allowed_tokens(row, vocab).tolist())

    def feed(text: str) -> bool:
        return all(matcher.accept(t) for t in hf.encode(text, add_special_tokens=False))

    # A reasoning model's own tokens stay free in the text; inside a call they are not.
    assert think in allowed() and matcher.accept(think) and feed("I should look.")
    assert matcher.accept(added["</think>"])
    assert feed("Let me look.") and start in allowed() and set(EOS) <= allowed()
    assert matcher.accept(start) and not set(EOS) & allowed(), "a call opened must be finished"
    assert think not in allowed()
    assert feed('{"name": "f", "arguments": {"a": 1}}') and end in allowed()
    assert matcher.accept(end) and feed(" Done.") and set(EOS) <= allowed()
    # The text may not spell a marker out to slip past the grammar.
    spelled = backend.matcher(spec)
    pieces = [
        *hf.encode("Hi <tool_", add_special_tokens=False),
        *hf.encode("call>", add_special_tokens=False),
    ]
    assert start not in pieces and not all(spelled.accept(t) for t in pieces)


STRICT_FAMILIES = [
    # (parser, tokens the tokenizer gets, a valid output: text pieces and [token names])
    ("hermes", [], ['Ok <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>']),
    ("llama3_json", ["<|python_tag|>"], [["<|python_tag|>"], '{"name": "f", "parameters": {"a": 1}}']),
    ("llama3_json", [], ['{"name": "f", "parameters": {"a": 1}}; {"name": "f", "parameters": {}}']),
    ("mistral", ["[TOOL_CALLS]"], ["Sure.", ["[TOOL_CALLS]"], '[{"name": "f", "arguments": {"a": 1}}]']),
    ("mistral", ["[TOOL_CALLS]", "[ARGS]"], [["[TOOL_CALLS]"], "f", ["[ARGS]"], '{"a": 1}']),
    ("granite", ["<|tool_call|>"], ["Sure.", ["<|tool_call|>"], '[{"name": "f", "arguments": {"a": 1}}]']),
    (
        "granite",
        ["<|tool_call|>"],
        [["<|tool_call|>"], '[{"name": "f", "arguments": {"a": 1}}, {"name": "f", "arguments": {}}]'],
    ),
]


def calls_alone(output: list) -> list:
    """A family's example output without its text before the calls."""
    calls = [piece for piece in output if piece != "Sure."]
    if isinstance(calls[0], str) and calls[0].startswith("Ok "):  # Hermes: the call without the text
        calls = [calls[0].removeprefix("Ok ")]
    return calls


class FamilyGrammar:
    """A parser family's calls grammar over the tiny tokenizer with `tokens` added (as special tokens),
    and whether it takes an output: text pieces, and [token] for an added token."""

    def __init__(
        self,
        tiny_tokenizer,
        family: str,
        tokens: list[str],
        strict: bool,
        answer: str | None,
        subgrammars: tuple[tuple[str, str], ...] = (),
        forced: bool = False,
    ) -> None:
        """forced: the family's grammar of a forced tool_choice (calls alone) instead of its calls
        grammar under auto."""
        self.hf = copy.deepcopy(tiny_tokenizer.hf)
        self.hf.add_tokens(tokens, special_tokens=True)
        self.added = {token: self.hf.convert_tokens_to_ids(token) for token in tokens}
        self.backend = LLGuidanceBackend.from_hf(self.hf, len(self.hf), EOS)
        tool = FunctionTool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}}, strict)
        parser = PARSERS[family]()
        grammar = (
            parser.forced_grammar([tool], self.added)
            if forced
            else parser.calls_grammar([tool], self.added, answer)
        )
        assert grammar is not None
        self.spec = StructuredOutputs(grammar=grammar, subgrammars=subgrammars)

    def takes(self, pieces: list, then_ends: bool = False) -> bool:
        """Every token accepted (and with then_ends, EOS allowed after them)."""
        ids = [
            i
            for piece in pieces
            for i in (
                [self.added[piece[0]]]
                if isinstance(piece, list)
                else self.hf.encode(piece, add_special_tokens=False)
            )
        ]
        return takes(self.backend, self.spec, ids, then_ends)


@pytest.mark.parametrize(("family", "tokens", "output"), STRICT_FAMILIES)
def test_each_family_s_strict_calls_fit_the_schema_and_plain_text_stays_free(
    tiny_tokenizer, family, tokens, output
) -> None:
    grammar = FamilyGrammar(tiny_tokenizer, family, tokens, strict=True, answer=None)
    assert grammar.takes(["No call, just text."], then_ends=True)
    assert grammar.takes(output, then_ends=True)
    last = output[-1]
    cut = [*output[:-1], last[: last.rindex('{"a": 1}') + len('{"a": 1')]]  # inside the arguments
    assert grammar.takes(cut)
    assert not grammar.takes([*cut[:-1], cut[-1] + ', "zz": 2']), "an undeclared key"
    renamed = [
        ("launch" if p == "f" else p.replace('"f"', '"launch"')) if isinstance(p, str) else p for p in cut
    ]
    assert not grammar.takes(renamed), "a function not offered"


FORCED_FAMILIES = [
    # (parser, tokens the tokenizer gets, calls laid out as chat templates render them)
    ("hermes", [], ['<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>']),
    (
        "hermes",
        ["<tool_call>", "</tool_call>"],
        [["<tool_call>"], '\n{"name": "f", "arguments": {"a": 1}}\n', ["</tool_call>"]],
    ),
    ("llama3_json", ["<|python_tag|>"], [["<|python_tag|>"], '{"name": "f", "parameters": {"a": 1}}']),
    ("llama3_json", [], ['{"name": "f", "parameters": {}}; {"name": "f", "parameters": {"a": 1}}']),
    ("mistral", ["[TOOL_CALLS]"], [["[TOOL_CALLS]"], '[{"name": "f", "arguments": {"a": 1}}]']),
    ("mistral", ["[TOOL_CALLS]", "[ARGS]"], [["[TOOL_CALLS]"], "f", ["[ARGS]"], '{"a": 1}']),
    ("granite", ["<|tool_call|>"], [["<|tool_call|>"], '[{"name": "f", "arguments": {"a": 1}}]']),
    (
        "granite",
        ["<|tool_call|>"],
        [["<|tool_call|>"], '[{"name": "f", "arguments": {}}, {"name": "f", "arguments": {"a": 1}}]'],
    ),
]


@pytest.mark.parametrize(("family", "tokens", "output"), FORCED_FAMILIES)
def test_each_family_s_forced_calls_are_its_markup_alone_fitting_the_schema(
    tiny_tokenizer, family, tokens, output
) -> None:
    """A forced tool_choice: calls alone, in the family's markup and in the JSON layout its templates
    render (json.dumps' separators); their arguments fit the schema even of a function not strict."""
    grammar = FamilyGrammar(tiny_tokenizer, family, tokens, strict=False, answer=None, forced=True)
    assert grammar.takes(output, then_ends=True)
    assert not grammar.takes([], then_ends=True), "no call at all"
    assert not grammar.takes(["No call, just text."])
    at = max(i for i, piece in enumerate(output) if isinstance(piece, str) and '"a": 1' in piece)
    head = output[at][: output[at].rindex('"a": 1') + len('"a": 1')]  # inside the arguments
    assert grammar.takes([*output[:at], head])
    assert not grammar.takes([*output[:at], head + ', "zz": 2']), "an undeclared key"
    assert not grammar.takes([*output[:at], head.replace('"a": 1', '"a":1')]), "another JSON layout"
    renamed = [
        ("launch" if p == "f" else p.replace('"f"', '"launch"')) if isinstance(p, str) else p
        for p in [*output[:at], head]
    ]
    assert not grammar.takes(renamed), "a function not offered"


@pytest.mark.parametrize(("family", "tokens", "output"), STRICT_FAMILIES)
def test_with_json_asked_for_each_family_answers_in_it_or_calls(
    tiny_tokenizer, family, tokens, output
) -> None:
    """response_format beside tools under auto: the output is the answer or calls, never free text."""
    answer = '%json {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}'
    grammar = FamilyGrammar(tiny_tokenizer, family, tokens, strict=False, answer=answer)
    assert grammar.takes(['{"answer": 42}'], then_ends=True)
    assert not grammar.takes(['{"answer": "forty-two"}'])
    assert not grammar.takes(["Some text."])
    assert grammar.takes(calls_alone(output), then_ends=True)


@pytest.mark.parametrize(("family", "tokens", "output"), STRICT_FAMILIES)
@pytest.mark.parametrize(
    ("answer", "lark", "taken", "refused"),
    [
        ("/[A-Z][a-z]+ [0-9]+/", None, "Paris 75", "paris 75"),
        ('"yes" | "no"', None, "no", "maybe"),
        # A Lark grammar of the client's, as a sub-grammar of the calls' grammar.
        ("@client", 'start: "Paris " NUM\nNUM: /[0-9]+/', "Paris 75", "paris 75"),
        ("@client", 'start: "[" WORD "]"\nWORD: /[a-z]+/', "[yes]", "[Yes]"),
    ],
)
def test_with_a_regex_choice_or_grammar_asked_for_each_family_answers_in_it_or_calls(
    tiny_tokenizer, family, tokens, output, answer, lark, taken, refused
) -> None:
    """structured_outputs' regex, choice or Lark grammar beside tools under auto: the answer or calls."""
    subgrammars = () if lark is None else (("client", lark),)
    grammar = FamilyGrammar(
        tiny_tokenizer, family, tokens, strict=False, answer=answer, subgrammars=subgrammars
    )
    assert grammar.takes([taken], then_ends=True)
    assert not grammar.takes([refused])
    assert not grammar.takes(["Some text."])
    assert grammar.takes(calls_alone(output), then_ends=True)


def test_granite_s_calls_are_one_array_after_its_token_and_end_the_output(tiny_tokenizer) -> None:
    """Granite's template asks for `<|tool_call|>` and a JSON list of the calls alone: nothing after the
    array, one call in it without parallel calls, and text may not spell the marker out. A tokenizer
    without the token has no Granite grammar (a forced call is then plain JSON)."""
    hf = copy.deepcopy(tiny_tokenizer.hf)
    hf.add_tokens([GRANITE_MARKER], special_tokens=True)
    marker = hf.convert_tokens_to_ids(GRANITE_MARKER)
    added = {GRANITE_MARKER: marker}
    backend = LLGuidanceBackend.from_hf(hf, len(hf), EOS)
    strict = FunctionTool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}}, True)

    def taken(grammar: str | None, pieces: list[str | int], then_ends: bool = True) -> bool:
        assert grammar is not None
        ids = [
            i
            for piece in pieces
            for i in ([piece] if isinstance(piece, int) else hf.encode(piece, add_special_tokens=False))
        ]
        return takes(backend, StructuredOutputs(grammar=grammar), ids, then_ends)

    first = '{"name": "f", "arguments": {"a": 1}}'
    two = f'[{first}, {{"name": "f", "arguments": {{}}}}]'
    free = GraniteParser().calls_grammar([strict], added)
    assert taken(free, ["Sure. ", marker, two])
    assert GraniteParser().extract("Sure. " + GRANITE_MARKER + two).content == "Sure."
    assert not taken(free, ["Sure. ", marker, two, " Done."], then_ends=False), "text after the calls"
    assert not taken(free, [marker, two, marker], then_ends=False), "a second marker"
    assert not taken(free, ["Hi <|tool_", "call|>", two], then_ends=False), "the marker spelled out"
    one = GraniteParser(max_calls=1).calls_grammar([strict], added)
    assert taken(one, [marker, f"[{first}]"])
    assert not taken(one, [marker, two], then_ends=False), "a second call without parallel calls"
    forced = GraniteParser(max_calls=1).forced_grammar([strict], added)
    assert taken(forced, [marker, f"[{first}]"])
    assert not taken(forced, [f"[{first}]"], then_ends=False), "no marker"
    assert GraniteParser().calls_grammar([strict], {}) is None
    assert GraniteParser().forced_grammar([strict], {}) is None


CODER_SCHEMA = {
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "limit": {"type": "integer"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "filters": {"type": "object", "properties": {"lang": {"type": "string"}}},
    },
    "required": ["query", "limit"],
}


# Qwen3-Coder's calls, and Seed-OSS's (the same markup in its own tags, each value against its tags).
CODER_FAMILIES = pytest.mark.parametrize(
    "family", [Qwen3CoderParser, SeedOssParser], ids=["qwen3_coder", "seed_oss"]
)


# Each family's tags, and the blank its chat template writes between a value and its tags.
TEMPLATE_LAYOUTS = {
    Qwen3CoderParser: ("<tool_call>", "</tool_call>", "\n"),
    SeedOssParser: ("<seed:tool_call>", "</seed:tool_call>", ""),
}


def coder_call(
    *parameters: tuple[str, str], name: str = "search", family: type[Qwen3CoderParser] = Qwen3CoderParser
) -> str:
    """A call laid out as the family's chat template renders it."""
    start, end, gap = TEMPLATE_LAYOUTS[family]
    body = "".join(f"<parameter={key}>{gap}{value}{gap}</parameter>\n" for key, value in parameters)
    return f"{start}\n<function={name}>\n{body}</function>\n{end}"


@CODER_FAMILIES
def test_qwen3_coder_forced_calls_are_its_markup_typed_by_the_schema(
    backend, tiny_tokenizer, family: type[Qwen3CoderParser]
) -> None:
    tool = FunctionTool("search", None, CODER_SCHEMA)

    def call(*parameters: tuple[str, str], name: str = "search") -> str:
        return coder_call(*parameters, name=name, family=family)

    grammar = family(max_calls=1, tools=[tool]).forced_grammar([tool], {})
    assert grammar is not None
    spec = StructuredOutputs(grammar=grammar)

    def taken(text: str, then_ends: bool = True) -> bool:
        return takes(backend, spec, tiny_tokenizer.hf.encode(text, add_special_tokens=False), then_ends)

    full = call(
        ("query", "two lines\nof text"), ("limit", "5"), ("unit", "celsius"), ("filters", '{"lang": "en"}')
    )
    assert taken(full)
    assert taken(call(("query", "x"), ("limit", "-3")))
    parsed = family(tools=[tool]).extract(full).tool_calls[0]
    assert json.loads(parsed.arguments) == {
        "query": "two lines\nof text",
        "limit": 5,
        "unit": "celsius",
        "filters": {"lang": "en"},
    }
    assert not taken(call(("query", "x")), then_ends=False), "a required parameter left out"
    assert not taken(call(("query", "x"), ("limit", "five")), then_ends=False), "not an integer"
    assert not taken(call(("query", "x"), ("limit", "5"), ("unit", "kelvin")), then_ends=False)
    assert not taken(call(("query", "x"), ("limit", "5"), ("zz", "1")), then_ends=False), "undeclared"
    assert not taken(call(("query", "x"), ("limit", "5"), name="launch"), then_ends=False)
    assert not taken(full + "\n" + full, then_ends=False), "one call at most"
    walked = greedy_walk(backend, spec, tiny_tokenizer, full)
    assert walked == full


@CODER_FAMILIES
def test_a_forced_qwen3_coder_value_holding_its_closing_tag_reads_back(
    backend, tiny_tokenizer, family: type[Qwen3CoderParser]
) -> None:
    """The grammar ends a string value only at its closing tag and the newline after it
    (`\\n</parameter>\\n` in Qwen3-Coder's layout), so the tag may stand inside it: the output it
    forces must read back as the call."""
    tool = FunctionTool("search", None, CODER_SCHEMA)
    spec = StructuredOutputs(grammar=family(max_calls=1, tools=[tool]).forced_grammar([tool], {}))
    output = coder_call(("query", "a </parameter> b"), ("limit", "5"), family=family)
    assert takes(backend, spec, tiny_tokenizer.hf.encode(output, add_special_tokens=False), then_ends=True)
    [call] = family(tools=[tool]).extract(output).tool_calls
    assert json.loads(call.arguments) == {"query": "a </parameter> b", "limit": 5}


@CODER_FAMILIES
def test_qwen3_coder_forces_plain_json_where_raw_text_cannot_carry_the_schema(
    family: type[Qwen3CoderParser],
) -> None:
    for parameters in (
        {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}},
        {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"type": "string"}}},
        {"type": "object", "additionalProperties": True},
    ):
        tool = FunctionTool("f", None, parameters)
        assert family(tools=[tool]).forced_grammar([tool], {}) is None, parameters


@CODER_FAMILIES
@pytest.mark.parametrize("marker_tokens", [False, True])
def test_qwen3_coder_strict_calls_in_free_text_and_beside_an_answer(
    tiny_tokenizer, marker_tokens, family: type[Qwen3CoderParser]
) -> None:
    hf = copy.deepcopy(tiny_tokenizer.hf)
    markers = [family.layout.start, family.layout.end] if marker_tokens else []
    hf.add_tokens(markers)
    added = {token: hf.convert_tokens_to_ids(token) for token in markers}
    backend = LLGuidanceBackend.from_hf(hf, len(hf), EOS)
    strict = FunctionTool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}}, True)
    free = FunctionTool("g", None, {"type": "object"}, False)

    def taken(spec: StructuredOutputs, text: str, then_ends: bool = True) -> bool:
        return takes(backend, spec, hf.encode(text, add_special_tokens=False), then_ends)

    def call(name: str, *parameters: tuple[str, str]) -> str:
        return coder_call(*parameters, name=name, family=family)

    spec = StructuredOutputs(grammar=family().calls_grammar([strict, free], added))
    assert taken(spec, "No call, just text.")
    assert taken(spec, f"Ok {call('f', ('a', '1'))} then {call('g', ('any', 'thing'), ('n', '2'))} done")
    assert not taken(spec, call("f", ("a", "one")), then_ends=False), "a strict function's integer"
    assert not taken(spec, call("f", ("zz", "1")), then_ends=False), "a strict function's undeclared key"
    assert not taken(spec, call("launch"), then_ends=False), "a function not offered"
    answer = '%json {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}'
    beside = StructuredOutputs(grammar=family().calls_grammar([strict, free], added, answer))
    assert taken(beside, '{"answer": 42}')
    assert taken(beside, call("f", ("a", "1")))
    assert not taken(beside, "Some text.", then_ends=False)
