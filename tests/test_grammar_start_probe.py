"""Grammars that compile but fail where every output begins are refused at the API edge (the probe over
single bytes, structured/start_probe.py); satisfiable ones, recursive ones included, pass; a grammar
whose lexer a sequence spends does not fail the next request of it."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured import start_probe
from batchlm.structured.backend import GrammarError
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.structured.start_probe import edge_checked_grammar
from grammar_walk import greedy_walk, tiny_backend

SELF_REQUIRED = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
NON_EMPTY_OF_ITSELF = {"type": "array", "items": {"$ref": "#"}, "minItems": 1}
# An object and an array that each require themselves.
ENDLESS_DEFS = {
    "O": {"type": "object", "properties": {"a": {"$ref": "#/$defs/O"}}, "required": ["a"]},
    "A": {"type": "array", "items": {"$ref": "#/$defs/A"}, "minItems": 1},
}
ENDLESS = "forces an output longer than the grammar engine can follow"
# Past llguidance's 2,000 items in a parser row once "{" is taken.
MANY_OPTIONAL = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(700)}}


def json_spec(schema: Any) -> StructuredOutputs:
    return StructuredOutputs(json=json.dumps(schema))


@pytest.fixture(scope="module")
def backend(tiny_tokenizer) -> LLGuidanceBackend:
    return tiny_backend(tiny_tokenizer)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (json_spec(SELF_REQUIRED), ENDLESS),
        (json_spec(NON_EMPTY_OF_ITSELF), ENDLESS),
        (
            json_spec(
                {
                    "$defs": {
                        "A": {
                            "type": "object",
                            "properties": {"b": {"$ref": "#/$defs/B"}},
                            "required": ["b"],
                        },
                        "B": {
                            "type": "object",
                            "properties": {"a": {"$ref": "#/$defs/A"}},
                            "required": ["a"],
                        },
                    },
                    "$ref": "#/$defs/A",
                }
            ),
            ENDLESS,
        ),
        # Every alternative requires itself: each byte the output may begin with fails.
        (
            json_spec({"anyOf": [{"$ref": "#/$defs/O"}, {"$ref": "#/$defs/A"}], "$defs": ENDLESS_DEFS}),
            ENDLESS,
        ),
        (StructuredOutputs(grammar='start: a\na: "x" a'), ENDLESS),
        (StructuredOutputs(regex="a{1000000}"), "too many expressions"),
        (json_spec(MANY_OPTIONAL), "max is 2000"),
    ],
    ids=["self-required", "non-empty-array-of-itself", "mutual", "any-of", "lark", "regex", "parser-row"],
)
def test_a_grammar_failing_where_every_output_begins_is_refused(
    spec: StructuredOutputs, fragment: str
) -> None:
    with pytest.raises(GrammarError, match=fragment):
        edge_checked_grammar(spec)


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems (3) is greater than maxItems (1)"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
        ({"type": "string", "minLength": 5, "maxLength": 1}, "minLength (5) is greater than maxLength (1)"),
        ({"type": "string", "enum": [1, 2]}, "incompatible types"),
        (
            {"type": "object", "properties": {}, "required": ["x"], "additionalProperties": False},
            "required property 'x' is unsatisfiable",
        ),
        (
            {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": 2, "maximum": 1}},
                "required": ["x"],
            },
            "required property 'x' is unsatisfiable",
        ),
    ],
    ids=["items", "numbers", "lengths", "enum-type", "required-forbidden", "required-unsatisfiable"],
)
def test_contradictory_constraints_are_refused_by_llguidance_s_own_check(schema: Any, fragment: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(fragment)):
        edge_checked_grammar(json_spec(schema))


@pytest.mark.parametrize(
    "spec",
    [
        json_spec({"type": "object", "properties": {"a": {"$ref": "#"}}}),
        json_spec({"type": "array", "items": {"$ref": "#"}}),
        json_spec(
            {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
                "required": ["v", "kids"],
            }
        ),
        json_spec({"anyOf": [SELF_REQUIRED, {"type": "integer"}]}),
        json_spec({"const": "ab" * 5000}),
        StructuredOutputs(regex="b|a{1000000}"),
        StructuredOutputs(regex="a{1000}"),
        StructuredOutputs(grammar='start: a\na: "x" a | "y"'),
        StructuredOutputs(grammar='start: "ab" <|im_end|>'),
        StructuredOutputs(choice=("yes", "no")),
        StructuredOutputs(json_object=True),
    ],
    ids=[
        "optional-self",
        "array-of-itself",
        "tree",
        "any-of-with-an-end",
        "long-const",
        "one-branch-ends",
        "long-regex",
        "lark-with-an-end",
        "special-token",
        "choice",
        "json-object",
    ],
)
def test_a_grammar_with_an_end_passes(spec: StructuredOutputs) -> None:
    edge_checked_grammar(spec)


def test_a_reasoning_preamble_does_not_hide_the_constraint_s_start() -> None:
    spec = StructuredOutputs(
        json=json.dumps(SELF_REQUIRED), preamble='preamble: "<think>" /[a-z]*/ "</think>"'
    )
    with pytest.raises(GrammarError, match=ENDLESS):
        edge_checked_grammar(spec)


def test_a_satisfiable_recursive_schema_is_followed_to_its_end(backend, tiny_tokenizer) -> None:
    spec = json_spec({"type": "object", "properties": {"a": {"$ref": "#"}}, "additionalProperties": False})
    edge_checked_grammar(spec)
    assert json.loads(greedy_walk(backend, spec, tiny_tokenizer, '{"a":{"a":{}}}')) == {"a": {"a": {}}}


def test_a_failing_probe_is_remembered(monkeypatch) -> None:
    spec = StructuredOutputs(regex="a{1000001}")
    with pytest.raises(GrammarError):
        edge_checked_grammar(spec)

    def again(spec: StructuredOutputs) -> str:
        raise AssertionError("probed again")

    monkeypatch.setattr(start_probe, "start_failure", again)
    with pytest.raises(GrammarError, match="too many expressions"):
        edge_checked_grammar(spec)


def test_a_spent_lexer_fails_only_the_sequence_that_spent_it(backend, tiny_tokenizer) -> None:
    # Copies of a compiled grammar share its lexer: one sequence walking into `a{1000000}` spends it.
    # The next request of the same grammar, which takes the "b" branch, must still be served.
    spec = StructuredOutputs(regex="b|a{1000000}")
    a, b = (tiny_tokenizer.encode(c, add_special_tokens=False)[0] for c in "ab")
    row = np.empty((1, backend.bitmask_words), dtype=np.int32)
    spender = backend.matcher(spec)
    for _ in range(3):
        backend.advance_and_fill([spender], [[a]], row)
    assert "too many expressions" in (spender.failure or "")
    later = backend.matcher(spec)
    assert backend.advance_and_fill([later], [[b]], row) == [True]
    assert later.failure is None and later.is_terminated


def test_the_refusal_leaves_out_advice_about_the_probe_s_own_tokens() -> None:
    # llguidance advises against short lexemes when a forced text overflows: true of the probe's
    # one-byte tokens, not of the client's grammar.
    spec = StructuredOutputs(grammar='start: a\na: "x" a')
    with pytest.raises(GrammarError) as refused:
        edge_checked_grammar(spec)
    assert ENDLESS in str(refused.value)
    assert "lexeme" not in str(refused.value)
