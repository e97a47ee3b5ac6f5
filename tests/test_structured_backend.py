"""The llguidance grammar backend: each kind of spec, GBNF conversion, compile errors and the caches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID
from batchlm.sampling_params import SamplingParamsError, StructuredOutputs
from batchlm.structured import llguidance_backend
from batchlm.structured import sequences as sequences_module
from batchlm.structured.backend import GrammarError, LRUCache, allowed_tokens
from batchlm.structured.llguidance_backend import (
    LLGuidanceBackend,
    lark_from_user_grammar,
    validated_cache,
    validated_grammar,
)
from batchlm.structured.sequences import ConstrainedSequences
from batchlm.structured.step_masks import PrefetchedMasks, SampledRows

EOS = (1, 3)


@pytest.fixture(scope="module")
def backend(tiny_tokenizer) -> LLGuidanceBackend:
    # 2048-token tokenizer, a model with a padded vocabulary of 2080.
    return LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS)


def greedy_walk(backend: LLGuidanceBackend, spec: StructuredOutputs, tokenizer, prefer: str) -> str:
    """Drive a matcher to the end, each step taking the allowed token whose text best continues
    `prefer` (else the lowest allowed id); returns the text produced."""
    matcher = backend.matcher(spec)
    row = np.empty(backend.bitmask_words, dtype=np.int32)
    text = ""
    for _ in range(200):
        matcher.fill_bitmask(row)
        allowed = allowed_tokens(row, 2080)
        assert len(allowed), "a live grammar always allows something"
        if matcher.is_terminated:
            assert set(allowed.tolist()) == set(EOS)
            return text
        rest = prefer[len(text) :]
        pieces = {int(t): tokenizer.decode([int(t)]) for t in allowed if int(t) not in EOS}
        fitting = [t for t, piece in pieces.items() if piece and rest.startswith(piece)]
        token = max(fitting, key=lambda t: len(pieces[t])) if fitting else int(allowed[0])
        if token in EOS:
            return text
        assert matcher.accept(token)
        text += pieces[token]
    raise AssertionError("the grammar never finished")


def test_json_schema_output_follows_the_schema(backend, tiny_tokenizer) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    text = greedy_walk(
        backend, StructuredOutputs(json=json.dumps(schema)), tiny_tokenizer, '{"name":"ab","n":42}'
    )
    assert json.loads(text) == {"name": "ab", "n": 42}


def test_a_forced_call_from_an_open_parameters_schema_writes_only_declared_keys(
    backend, tiny_tokenizer
) -> None:
    from batchlm.tools.closed_schema import closed_objects

    parameters = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    wanted = '{"a":1,"zz":2}'
    open_text = greedy_walk(backend, StructuredOutputs(json=json.dumps(parameters)), tiny_tokenizer, wanted)
    assert json.loads(open_text) == {"a": 1, "zz": 2}, "the open schema takes the extra key"
    spec = StructuredOutputs(json=json.dumps(closed_objects(parameters)))
    # Once "zz" cannot follow, the walk takes the lowest allowed ids: digits, then the object's end.
    assert set(json.loads(greedy_walk(backend, spec, tiny_tokenizer, wanted))) == {"a"}


def test_a_strict_function_s_calls_in_free_text_are_held_to_the_tools(backend, tiny_tokenizer) -> None:
    from batchlm.tools.function_tool import FunctionTool
    from batchlm.tools.hermes import HermesParser

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
    import copy

    from batchlm.tools.function_tool import FunctionTool
    from batchlm.tools.hermes import END, START, HermesParser

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
]


class FamilyGrammar:
    """A parser family's calls grammar over the tiny tokenizer with `tokens` added (as special tokens),
    and whether it takes an output: text pieces, and [token] for an added token."""

    def __init__(
        self, tiny_tokenizer, family: str, tokens: list[str], strict: bool, answer: str | None
    ) -> None:
        import copy

        from batchlm.tools.function_tool import FunctionTool
        from batchlm.tools.registry import PARSERS

        self.hf = copy.deepcopy(tiny_tokenizer.hf)
        self.hf.add_tokens(tokens, special_tokens=True)
        self.added = {token: self.hf.convert_tokens_to_ids(token) for token in tokens}
        self.backend = LLGuidanceBackend.from_hf(self.hf, len(self.hf), EOS)
        tool = FunctionTool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}}, strict)
        grammar = PARSERS[family]().calls_grammar([tool], self.added, answer)
        assert grammar is not None
        self.spec = StructuredOutputs(grammar=grammar)

    def takes(self, pieces: list, then_ends: bool = False) -> bool:
        """Every token accepted (and with then_ends, EOS allowed after them)."""
        matcher = self.backend.matcher(self.spec)
        ids = [
            i
            for piece in pieces
            for i in (
                [self.added[piece[0]]]
                if isinstance(piece, list)
                else self.hf.encode(piece, add_special_tokens=False)
            )
        ]
        if not all(matcher.accept(i) for i in ids):
            return False
        row = np.empty(self.backend.bitmask_words, dtype=np.int32)
        matcher.fill_bitmask(row)
        return not then_ends or bool(set(EOS) & set(allowed_tokens(row, len(self.hf)).tolist()))


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
    calls = [piece for piece in output if piece != "Sure."]
    if isinstance(calls[0], str) and calls[0].startswith("Ok "):  # Hermes: the call without the text
        calls = [calls[0].removeprefix("Ok ")]
    assert grammar.takes(calls, then_ends=True)


def test_bitmask_forbids_what_the_grammar_cannot_take(backend, tiny_tokenizer) -> None:
    matcher = backend.matcher(StructuredOutputs(regex="[0-9]+"))
    row = np.empty(backend.bitmask_words, dtype=np.int32)
    matcher.fill_bitmask(row)
    allowed = allowed_tokens(row, 2080)
    texts = [tiny_tokenizer.decode([int(t)]) for t in allowed]
    assert texts and all(t.isdigit() for t in texts)
    assert all(t < 2048 for t in allowed), "padding ids are never allowed"
    letter = tiny_tokenizer.encode("a", add_special_tokens=False)[0]
    assert letter not in allowed.tolist()


def test_regex_choice_and_lark(backend, tiny_tokenizer) -> None:
    assert greedy_walk(backend, StructuredOutputs(regex=r"(cat|dog)s?"), tiny_tokenizer, "dogs") == "dogs"
    choice = StructuredOutputs(choice=("red", "green", 'say "hi"'))
    assert greedy_walk(backend, choice, tiny_tokenizer, "green") == "green"
    assert greedy_walk(backend, choice, tiny_tokenizer, 'say "hi"') == 'say "hi"'
    lark = 'start: "(" item ("," item)* ")"\nitem: /[a-c]/'
    assert greedy_walk(backend, StructuredOutputs(grammar=lark), tiny_tokenizer, "(a,b,c)") == "(a,b,c)"


def test_json_object_allows_any_object(backend, tiny_tokenizer) -> None:
    text = greedy_walk(backend, StructuredOutputs(json_object=True), tiny_tokenizer, '{"k":[1,true,null]}')
    assert json.loads(text) == {"k": [1, True, None]}


def test_gbnf_is_converted_to_lark(backend, tiny_tokenizer) -> None:
    gbnf = 'root ::= answer "!"\nanswer ::= "yes" | "no"'
    lark = lark_from_user_grammar(gbnf)
    assert "::=" not in lark
    assert greedy_walk(backend, StructuredOutputs(grammar=lark), tiny_tokenizer, "no!") == "no!"
    assert lark_from_user_grammar('start: "x"') == 'start: "x"'
    with pytest.raises(GrammarError, match="GBNF"):
        lark_from_user_grammar("root ::= (")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (StructuredOutputs(json='{"type": "strin"}'), "strin"),
        (StructuredOutputs(json="{not json"), "JSON"),
        (StructuredOutputs(regex="a[bc"), "unclosed character class"),
        (StructuredOutputs(grammar="start: missing_rule"), "missing_rule"),
    ],
)
def test_bad_specs_raise_an_error_naming_the_problem(spec, fragment) -> None:
    with pytest.raises(GrammarError, match=fragment):
        validated_grammar(spec)


def test_specs_are_well_formed() -> None:
    with pytest.raises(SamplingParamsError):
        StructuredOutputs()
    with pytest.raises(SamplingParamsError):
        StructuredOutputs(regex="a", json_object=True)
    with pytest.raises(SamplingParamsError):
        StructuredOutputs(choice=())


def test_compiled_grammars_are_cached_by_key(backend) -> None:
    spec = StructuredOutputs(regex="x+y")
    validated = validated_cache()
    hits = validated.hits
    validated_grammar(spec)
    validated_grammar(StructuredOutputs(regex="x+y"))
    assert validated.hits == hits + 1
    compiled = backend.compiled_cache
    misses, hits = compiled.misses, compiled.hits
    first, second = backend.matcher(spec), backend.matcher(StructuredOutputs(regex="x+y"))
    assert (compiled.misses, compiled.hits) == (misses + 1, hits + 1)
    assert first.inner is not second.inner, "each sequence gets its own matcher state"


def test_lru_cache_evicts_the_least_recently_used() -> None:
    cache: LRUCache[str, int] = LRUCache(2)
    cache.get_or_make("a", lambda: 1)
    cache.get_or_make("b", lambda: 2)
    cache.get_or_make("a", lambda: 0)  # a is now the most recent
    cache.get_or_make("c", lambda: 3)
    assert cache.get_or_make("a", lambda: -1) == 1
    assert cache.get_or_make("b", lambda: -2) == -2, "b was evicted"


def test_sequences_follow_output_tokens_and_batch_masks(backend, tiny_tokenizer) -> None:
    sequences = ConstrainedSequences(lambda eos: backend)
    digits: list[int] = []
    letters: list[int] = []
    sequences.add("digits", StructuredOutputs(regex="[0-9]{2}"), digits, EOS)
    sequences.add("letters", StructuredOutputs(regex="[a-z]+"), letters, EOS)
    masks = sequences.compute_masks([(0, "digits"), (2, "letters")])
    assert masks.rows == (0, 2)
    assert masks.bitmask.shape == (2, backend.bitmask_words)
    seven = tiny_tokenizer.encode("7", add_special_tokens=False)[0]
    assert seven in allowed_tokens(masks.bitmask[0], 2080).tolist()
    assert seven not in allowed_tokens(masks.bitmask[1], 2080).tolist()
    digits.extend([seven, seven])  # the runner appends sampled tokens to the same list
    masks = sequences.compute_masks([(0, "digits")])
    assert set(allowed_tokens(masks.bitmask[0], 2080).tolist()) == set(EOS)
    sequences.drop(["digits"])
    assert "digits" not in sequences and "letters" in sequences
    sequences.close()


def test_prefetch_prepares_its_batch_once_while_the_sequences_stay(
    backend, tiny_tokenizer, monkeypatch
) -> None:
    """Steady decoding (each sequence one token behind its slot) reuses the batch prepared for the same
    sequences; a sequence replaced or still behind by earlier tokens leads to a new one. The masks are
    those of a matcher fed the same tokens in every case."""
    prepared: list[int] = []

    class CountedBatch(sequences_module._PreparedBatch):
        def __init__(self, backend, request_ids, sequences) -> None:
            prepared.append(len(sequences))
            super().__init__(backend, request_ids, sequences)

    monkeypatch.setattr(sequences_module, "_PreparedBatch", CountedBatch)
    spec = StructuredOutputs(regex="[a-z]{1,60}")
    letter = tiny_tokenizer.encode("k", add_special_tokens=False)[0]
    sequences = ConstrainedSequences(lambda eos: backend)
    lists: dict[str, list[int]] = {"a": [], "b": []}
    for request_id, tokens in lists.items():
        sequences.add(request_id, spec, tokens, EOS)
    out = np.empty((3, backend.bitmask_words), dtype=np.int32)

    def step() -> PrefetchedMasks:
        # The engine samples row 1 for "a", row 0 for "b", row 2 for any other.
        rows = {"a": 1, "b": 0}
        ids = list(lists)
        slots = SampledRows(ids, [rows.get(rid, 2) for rid in ids], [len(lists[rid]) for rid in ids])
        for tokens in lists.values():
            tokens.append(PLACEHOLDER_TOKEN_ID)
        masks = sequences.prefetch_masks(slots, lambda: [letter] * 3, out).result()
        for tokens in lists.values():
            tokens[-1] = letter
        return masks

    def expected_row(length: int) -> np.ndarray:
        reference, row = backend.matcher(spec), np.empty(backend.bitmask_words, dtype=np.int32)
        for _ in range(length):
            assert reference.accept(letter)
        reference.fill_bitmask(row)
        return row

    def check(masks: PrefetchedMasks) -> None:
        assert list(masks.index) == list(lists)
        for request_id, row in masks.index.items():
            assert np.array_equal(masks.bitmask[row], expected_row(len(lists[request_id])))

    for _ in range(3):
        check(step())
    assert prepared == [2], "one batch for three steps of the same sequences"
    sequences.drop(["b"])
    lists["b"] = [letter] * 5  # back after preemption: five tokens its new matcher has not seen
    sequences.add("b", spec, lists["b"], EOS)
    check(step())
    assert prepared == [2], "earlier tokens to accept: the general path"
    check(step())
    assert prepared == [2, 2], "a new sequence object: a new batch"
    sequences.close()


def test_a_grammar_the_engine_cannot_compile_ends_the_sequence(backend) -> None:
    sequences = ConstrainedSequences(lambda eos: backend)
    sequences.add("bad", StructuredOutputs(grammar="start: nowhere"), [], EOS)
    masks = sequences.compute_masks([(0, "bad")])
    assert set(allowed_tokens(masks.bitmask[0], 2080).tolist()) == set(EOS)
    sequences.close()


def test_a_grammar_many_sequences_use_is_compiled_several_times(tiny_tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(llguidance_backend, "TEMPLATES_PER_THREAD", 1)
    backend = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS, threads=3)
    spec = StructuredOutputs(regex="[a-z]{1,8}")
    matchers = [backend.matcher(spec) for _ in range(7)]
    pool = backend.compiled_cache.get_or_make(spec.key, lambda: pytest.fail("compiled again"))
    assert len(pool.templates) == 3
    assert [m.family for m in matchers] == [0, 1, 2, 0, 1, 2, 0]
    one_thread = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS, threads=1)
    assert {one_thread.matcher(spec).family for _ in range(3)} == {0}
    assert len({id(m.inner) for m in matchers}) == 7, "each sequence gets its own matcher state"
    one = backend.matcher(StructuredOutputs(regex="[0-9]+"))
    assert len(backend.compiled_cache.get_or_make(("regex", "[0-9]+"), lambda: pytest.fail()).templates) == 1
    assert one.family == 0


def test_batched_masks_and_advance_match_one_matcher_at_a_time(tiny_tokenizer) -> None:
    """Rows of several templates, in several states, filled and advanced together (grouped by
    template inside the backend) end where the same matchers driven one at a time end."""
    batched = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS, threads=3, batched_accept=True)
    alone = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    specs = [StructuredOutputs(json=json.dumps(schema))] * 6 + [StructuredOutputs(regex="x+y")]
    matchers = [batched.matcher(spec) for spec in specs]
    references = [alone.matcher(spec) for spec in specs]
    rng = np.random.default_rng(0)
    bitmask = np.zeros((len(matchers), batched.bitmask_words), dtype=np.int32)
    row = np.zeros(batched.bitmask_words, dtype=np.int32)
    for step in range(6):
        batched.fill_bitmasks(matchers, bitmask)
        tokens: list[list[int]] = []
        for index, reference in enumerate(references):
            reference.fill_bitmask(row)
            assert np.array_equal(row, bitmask[index]), (step, index)
            allowed = [t for t in allowed_tokens(row, 2080).tolist() if t not in EOS]
            picked = [int(rng.choice(allowed))] if allowed and (index + step) % 3 else []
            assert all(reference.accept(token) for token in picked)
            tokens.append(picked)
        assert all(batched.advance(matchers, tokens))


def test_extra_templates_are_bounded_in_all_and_come_back_on_eviction(tiny_tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(llguidance_backend, "TEMPLATES_PER_THREAD", 1)
    monkeypatch.setattr(llguidance_backend, "EXTRA_TEMPLATES", 2)
    first, second = StructuredOutputs(regex="[a-z]+"), StructuredOutputs(regex="[0-9]+")
    both_cached = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS, threads=3)
    assert [both_cached.matcher(first).family for _ in range(4)] == [0, 1, 2, 0], "two extras: the budget"
    assert [both_cached.matcher(second).family for _ in range(3)] == [0, 0, 0], "none left"
    monkeypatch.setattr(llguidance_backend, "CACHE_SIZE", 1)
    one_cached = LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS, threads=3)
    assert [one_cached.matcher(first).family for _ in range(3)] == [0, 1, 2]
    # The cache holds one grammar: `first` is evicted and its extra templates go back to the budget.
    assert [one_cached.matcher(second).family for _ in range(3)] == [0, 1, 2]


def test_the_backend_s_token_slices_leave_every_mask_as_llguidance_s_own_slices_make_it(
    backend, tiny_tokenizer
) -> None:
    """Slices only spare work: along random walks through strings of several length bounds (where the
    shorter slices apply near each bound), every mask equals the one llguidance's general slices give."""
    import llguidance
    import llguidance.hf

    general = llguidance.LLTokenizer.general_slices()
    assert f"{llguidance_backend.JSON_STRING_CHAR}{{1,10}}" in general  # our spelling is llguidance's
    assert set(general) < set(llguidance_backend.token_slices())
    plain_tokenizer = llguidance.hf.from_tokenizer(
        tiny_tokenizer.hf, n_vocab=2080, eos_token=list(EOS), slices=general
    )
    plain = LLGuidanceBackend(plain_tokenizer, EOS)
    bounds = (3, 7, 13, 22, 40)
    properties = {f"s{n}": {"type": "string", "maxLength": n} for n in bounds} | {"free": {"type": "string"}}
    schema = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    spec = StructuredOutputs(json=json.dumps(schema))
    rng = np.random.default_rng(0)
    ours_row = np.empty(backend.bitmask_words, dtype=np.int32)
    theirs_row = np.empty(plain.bitmask_words, dtype=np.int32)
    masks = 0
    for _ in range(6):
        ours, theirs = backend.matcher(spec), plain.matcher(spec)
        for _ in range(150):
            ours.fill_bitmask(ours_row)
            theirs.fill_bitmask(theirs_row)
            assert np.array_equal(ours_row, theirs_row)
            masks += 1
            if ours.is_terminated:
                break
            token = int(rng.choice(allowed_tokens(ours_row, 2080)))
            assert ours.accept(token) and theirs.accept(token)
    assert masks > 300


def test_a_prefetch_without_token_ids_leaves_its_sequences_as_they_were(backend, tiny_tokenizer) -> None:
    """Tokens that travel packed with logprobs reach no prefetch: the steady path, whose bookkeeping is
    done before the tokens land, undoes it, and the next prefetch's masks follow every token."""
    spec = StructuredOutputs(regex="[a-z]{2}")
    letter = tiny_tokenizer.encode("k", add_special_tokens=False)[0]
    sequences = ConstrainedSequences(lambda eos: backend)
    tokens: list[int] = []
    sequences.add("a", spec, tokens, EOS)
    out = np.empty((1, backend.bitmask_words), dtype=np.int32)
    tokens.append(PLACEHOLDER_TOKEN_ID)
    nothing = sequences.prefetch_masks(SampledRows(["a"], [0], [0]), lambda: None, out).result()
    assert nothing.index == {} and not nothing.complete
    tokens[0] = letter
    tokens.append(PLACEHOLDER_TOKEN_ID)
    masks = sequences.prefetch_masks(SampledRows(["a"], [0], [1]), lambda: [letter], out).result()
    assert masks.index == {"a": 0}
    assert set(allowed_tokens(masks.bitmask[0], 2080).tolist()) == set(EOS), "both letters accepted"
    sequences.close()
