"""A structured-output spec's constraint as llguidance grammar text: JSON schemas, regexes, choices and
Lark or GBNF grammars (with a preamble before them) in one grammar form, checked without a tokenizer
and cached. The backend (llguidance_backend.py) compiles that text against the model's tokenizer."""

from __future__ import annotations

import json
import threading

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from batchlm import json_text
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarError, LRUCache

# Compact JSON: flexible whitespace would let a weak model spend its whole budget on blanks.
JSON_OPTIONS: llguidance._lib.JsonCompileOptions = {"whitespace_flexible": False}
ANY_JSON_OBJECT = '{"type": "object"}'
# Grammar texts validated in this process (API edge and engine alike), by StructuredOutputs.key.
CACHE_SIZE = 256
_validated: LRUCache[tuple[str, str], str] = LRUCache(CACHE_SIZE)
_validated_lock = threading.Lock()


def lark_from_user_grammar(text: str) -> str:
    """A grammar as a client sent it, as Lark: GBNF (it uses `::=`) is converted. Raises GrammarError."""
    if "::=" not in text:
        return text
    try:
        return any_to_lark(text)
    except Exception as exc:  # the converter raises plain exceptions for bad GBNF
        raise GrammarError(f"the GBNF grammar could not be converted: {exc}") from None


def grammar_text(spec: StructuredOutputs) -> str:
    """llguidance's grammar for a spec (not yet checked). Raises GrammarError for a schema that is not JSON."""
    constraint = _constraint_text(spec)
    if spec.preamble is None:
        return constraint
    # Two grammars in one: the preamble's Lark rules, then the constraint, which Lark names by `@answer`.
    # The constraint's own grammars (its sub-grammars) keep their names after it.
    answer = (
        json.loads(constraint)["grammars"] if constraint.startswith("{") else [{"lark_grammar": constraint}]
    )
    opening = {"lark_grammar": f"start: preamble @answer\n{spec.preamble}"}
    return json.dumps({"grammars": [opening, {**answer[0], "name": "answer"}, *answer[1:]]})


def _constraint_text(spec: StructuredOutputs) -> str:
    if spec.json is not None or spec.json_object:
        schema = ANY_JSON_OBJECT if spec.json is None else _object_schema(spec.json)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema cannot be used: {exc}") from None
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.LLMatcher.grammar_from_lark(f"start: {lark_terminal(spec)}")
    assert spec.grammar is not None
    if not spec.subgrammars:
        return llguidance.LLMatcher.grammar_from_lark(spec.grammar)
    named = [{"name": name, "lark_grammar": text} for name, text in spec.subgrammars]
    return json.dumps({"grammars": [{"lark_grammar": spec.grammar}, *named]})


def _object_schema(text: str) -> str:
    """A schema's JSON text as llguidance takes it: an object. The boolean schemas are JSON Schema's
    "any value" (true, as {}) and "no value" (false, refused)."""
    try:
        schema = json_text.loads(text)
    except json_text.NestingTooDeep as exc:
        raise GrammarError(f"the JSON schema cannot be used: {exc}") from None
    except ValueError as exc:
        raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
    if schema is True:
        return "{}"
    if schema is False:
        raise GrammarError("the JSON schema is `false`, which no value satisfies")
    return text


# The characters Rust's regex syntax gives a meaning (regex_syntax::is_meta_character).
REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")


def literal_regex(text: str) -> str:
    """A regex matching exactly `text` (Rust syntax, which escapes only its meta characters)."""
    return "".join(f"\\{c}" if c in REGEX_META else c for c in text)


def lark_terminal(spec: StructuredOutputs) -> str | None:
    """A regex or choice constraint as one Lark rule body, a `/.../` terminal, for grammars that take
    it among other rules; None for the other kinds. The choices are one terminal, not alternatives of
    the rule: the parser holds an item per alternative still open, and past llguidance's 2000 a row
    (a choice list that long) it fails on the first token, its sequence ending there."""
    if spec.regex is not None:
        return f"/{llguidance.regex_to_lark(spec.regex, '')}/"
    if spec.choice is not None:
        alternatives = "|".join(literal_regex(c) for c in spec.choice)
        return f"/{llguidance.regex_to_lark(f'(?:{alternatives})', '')}/"
    return None


def validated_grammar(spec: StructuredOutputs) -> str:
    """The spec's grammar, checked (tokenizer-independent checks) and cached by spec.key.
    Raises GrammarError naming the problem."""

    def make() -> str:
        text = grammar_text(spec)
        error = llguidance.LLMatcher.validate_grammar(text)
        if error:
            raise compile_error(spec, error)
        return text

    with _validated_lock:
        return _validated.get_or_make(spec.key, make)


def validated_cache() -> LRUCache[tuple[str, str], str]:
    return _validated


def compile_error(spec: StructuredOutputs, error: str) -> GrammarError:
    """The error of a spec that does not compile, naming its kind and llguidance's reason."""
    return GrammarError(f"the {spec_name(spec)} does not compile: {error.strip()}")


def spec_name(spec: StructuredOutputs) -> str:
    """The spec's kind as an error names it ("JSON schema", "regex", ...)."""
    kind = spec.constraint_key[0]
    return {"json": "JSON schema", "json_object": "JSON grammar", "choice": "choice grammar"}.get(kind, kind)
