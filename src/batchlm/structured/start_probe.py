"""The API edge's probe of where every output of a grammar must begin, without the model's tokenizer.

Some grammars pass llguidance's checks and compile, then fail on the first token a sequence takes:
a JSON schema or Lark rule that requires itself (no finite value), a regex past the lexer's limits
(`a{1000000}`), an object of so many optional properties that a parser row overflows. llguidance finds
each while it computes the text the grammar forces from the start, the same with any tokenizer. A
matcher over single bytes walks that forced text at the edge, then tries each byte where it first
branches (an anyOf whose every alternative requires itself), so such a grammar is a 400 naming its
field, not a request that fails in the engine. A failure on a path the model chooses (an optional
property that requires itself, or one two branches deep) is not found here; the engine ends that
request with the error.
"""

from __future__ import annotations

import dataclasses
import threading

import llguidance
import numpy as np

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarError, LRUCache, allowed_tokens
from batchlm.structured.llguidance_backend import CACHE_SIZE, LEXER_FAILURE
from batchlm.structured.spec_grammar import spec_name, validated_grammar

BYTE_EOS = 256
# The bitmask of the byte tokenizer: 257 ids in 32-bit words.
BYTE_MASK_WORDS = (BYTE_EOS + 1 + 31) // 32
# What llguidance says when the forced text overflows its parser (a self-requiring value has no end).
ENDLESS_FORCED_TEXT = "ff_tokens"
# Where llguidance's message on an overflowing forced text starts its advice for the tokenizer.
BYTE_TOKEN_ADVICE = "; try avoiding"
# The most bytes tried where the forced text ends (each trial may walk a long forced text).
MAX_BRANCHES = 16


class _ByteTokens:
    """One token per byte and an EOS: what llguidance's TokenizerWrapper reads."""

    def __init__(self) -> None:
        self.eos_token_id = BYTE_EOS
        self.bos_token_id = None
        self.tokens = [bytes([b]) for b in range(256)] + [b"<|end|>"]
        self.special_token_ids = [BYTE_EOS]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


_tokenizer: llguidance.LLTokenizer | None = None
# spec.key -> the probe's error ("" when the start is sound): a failing probe can cost a fraction of a
# second (the lexer's limit), so a client repeating the grammar does not pay it again.
_probed: LRUCache[tuple[str, str], str] = LRUCache(CACHE_SIZE)
_lock = threading.Lock()


def byte_tokenizer() -> llguidance.LLTokenizer:
    global _tokenizer
    with _lock:
        if _tokenizer is None:
            # No slices: with 257 tokens a mask is cheap without them.
            _tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokens()), slices=[])
        return _tokenizer


def edge_checked_grammar(spec: StructuredOutputs) -> str:
    """validated_grammar, and the probe of the spec's start. Raises GrammarError naming the problem.
    A reasoning preamble is left out of the probe: the model may take it or not, and the constraint
    follows either way."""
    text = validated_grammar(spec)
    constraint = dataclasses.replace(spec, preamble=None)
    with _lock:
        error = _probed.get(constraint.key)
    if error is None:
        error = start_failure(constraint)
        with _lock:
            _probed.get_or_make(constraint.key, lambda: error)
    if error:
        raise GrammarError(error)
    return text


def start_failure(spec: StructuredOutputs) -> str:
    """Why the spec's grammar fails where every output must begin ("" if it does not)."""
    text = validated_grammar(spec)
    matcher = llguidance.LLMatcher(byte_tokenizer(), text, log_level=0)
    if matcher.is_error():
        # Not the grammar's fault (validate_grammar passed): it names tokens the bytes lack.
        return ""
    row = np.zeros(BYTE_MASK_WORDS, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
    prefix = _take_forced(matcher, row)
    reason = _error(matcher) or _every_branch_fails(matcher, text, prefix, row)
    if not reason:
        return ""
    name = spec_name(spec)
    if ENDLESS_FORCED_TEXT in reason:
        return (
            f"the {name} forces an output longer than the grammar engine can follow ({reason}): "
            "a value or rule that requires itself, such as a required property or a non-empty array "
            "of its own schema, has no finite output"
        )
    return f"the {name} fails in the grammar engine where every output begins ({reason})"


def _error(matcher: llguidance.LLMatcher) -> str:
    """The matcher's error, its first line (the rest is the parser's state); "" if none."""
    if not matcher.is_error():
        return ""
    first_line = str(matcher.get_error()).strip().split("\n", 1)[0]
    # llguidance's advice on short lexemes is about the probe's one-byte tokens, not the client's grammar.
    return first_line.split(BYTE_TOKEN_ADVICE, 1)[0]


def _take_forced(matcher: llguidance.LLMatcher, row: np.ndarray) -> list[int]:
    """Take the text the grammar forces next, then fill `row` with the mask after it: taking it is
    where llguidance meets its limits (it computes what follows). The forced tokens; errors stay in
    the matcher."""
    forced = [] if matcher.is_error() else matcher.compute_ff_tokens()
    if forced and not matcher.is_error():
        matcher.consume_tokens(forced)
        if not matcher.is_error():
            matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
    return forced


def _every_branch_fails(matcher: llguidance.LLMatcher, text: str, prefix: list[int], row: np.ndarray) -> str:
    """Where the forced text `prefix` ends, the output branches (`row`: the mask there). The error of
    the first branch that fails if every byte allowed there does (its forced text has no end, say,
    in every alternative of an anyOf) and the output may not end; "" if one does not, or there are
    too many to try. Copies of `matcher` share its lexer: once one trial has spent it, the next ones
    are fresh matchers taking the prefix again."""
    allowed = allowed_tokens(row, BYTE_EOS + 1)
    if BYTE_EOS in allowed or not 0 < len(allowed) <= MAX_BRANCHES:
        return ""
    first = ""
    trial_row = np.zeros_like(row)
    for byte in allowed:
        if LEXER_FAILURE in first:
            trial = llguidance.LLMatcher(byte_tokenizer(), text, log_level=0)
            trial.consume_tokens(prefix)
        else:
            trial = matcher.deep_copy()
        if trial.consume_token(int(byte)):
            trial.unsafe_compute_mask_ptr(trial_row.ctypes.data, trial_row.nbytes)
            _take_forced(trial, trial_row)
        error = _error(trial)
        if not error:
            return ""
        first = first or error
    return first
