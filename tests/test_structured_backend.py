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
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.structured.sequences import ConstrainedSequences
from batchlm.structured.spec_grammar import lark_from_user_grammar, validated_cache, validated_grammar
from batchlm.structured.step_masks import PrefetchedMasks, SampledRows
from grammar_walk import EOS, greedy_walk, tiny_backend


@pytest.fixture(scope="module")
def backend(tiny_tokenizer) -> LLGuidanceBackend:
    return tiny_backend(tiny_tokenizer)


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
        # Python's reader raises RecursionError here, which LLM's callers would get instead.
        (StructuredOutputs(json="[" * 5000 + "]" * 5000), "nest more than 200"),
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
    with pytest.raises(SamplingParamsError, match="subgrammars"):
        StructuredOutputs(regex="a", subgrammars=(("client", 'start: "a"'),))
    # Sub-grammars are part of what identifies a compiled grammar.
    named = StructuredOutputs(grammar='start: "a" @x', subgrammars=(("x", 'start: "b"'),))
    other = StructuredOutputs(grammar='start: "a" @x', subgrammars=(("x", 'start: "c"'),))
    assert named.key != other.key and named.key[0] == "grammar+subgrammars"


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


def test_a_long_choice_list_is_followed_to_its_end(backend, tiny_tokenizer) -> None:
    """Past 2000 choices, alternatives of one rule overflowed llguidance's parser row on the first
    token, and the sequence ended there, its output matching none of them."""
    choice = StructuredOutputs(choice=tuple(f"c{i}" for i in range(2500)))
    assert greedy_walk(backend, choice, tiny_tokenizer, "c2499") == "c2499"


def test_choices_with_regex_characters_are_taken_literally(backend, tiny_tokenizer) -> None:
    choices = ("a.b", "(x|y)*", "1+1=2", "a/b", "[~]", 'q"\\', "a", "ab")
    spec = StructuredOutputs(choice=choices)
    for text in choices:
        assert greedy_walk(backend, spec, tiny_tokenizer, text) == text
    assert greedy_walk(backend, spec, tiny_tokenizer, "axb") == "a"
