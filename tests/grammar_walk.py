"""What the grammar tests share: the tiny tokenizer's backend and a greedy walk through a grammar."""

from __future__ import annotations

import numpy as np

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import allowed_tokens
from batchlm.structured.llguidance_backend import LLGuidanceBackend

EOS = (1, 3)

# A schema the edge's probe passes that fails in the engine on one of the first tokens: an array or an
# object, each of a value that is itself an endless array or object (one requiring itself). The
# output's start branches, so no forced text reaches the endless part; whichever branch a model takes,
# its forced text has no end.
_ENDLESS_DEFS = {
    "O": {"type": "object", "properties": {"a": {"$ref": "#/$defs/O"}}, "required": ["a"]},
    "A": {"type": "array", "items": {"$ref": "#/$defs/A"}, "minItems": 1},
    "X": {"anyOf": [{"$ref": "#/$defs/O"}, {"$ref": "#/$defs/A"}]},
}
BRANCHING_ENDLESS = {
    "anyOf": [
        {"type": "array", "items": {"$ref": "#/$defs/X"}, "minItems": 1},
        {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/X"}},
            "required": ["a"],
            "additionalProperties": False,
        },
    ],
    "$defs": _ENDLESS_DEFS,
}
# llguidance's error when a forced text has no end.
ENDLESS_LIMIT = "Too many items"

# The tiny tokenizer has 2048 tokens; its model pads the vocabulary to 2080.
VOCAB = 2080


def tiny_backend(tiny_tokenizer) -> LLGuidanceBackend:
    return LLGuidanceBackend.from_hf(tiny_tokenizer.hf, VOCAB, EOS)


def greedy_walk(backend: LLGuidanceBackend, spec: StructuredOutputs, tokenizer, prefer: str) -> str:
    """Drive a matcher to the end, each step taking the allowed token whose text best continues
    `prefer` (else the lowest allowed id); returns the text produced."""
    matcher = backend.matcher(spec)
    row = np.empty(backend.bitmask_words, dtype=np.int32)
    text = ""
    for _ in range(200):
        matcher.fill_bitmask(row)
        allowed = allowed_tokens(row, VOCAB)
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


def takes(
    backend: LLGuidanceBackend, spec: StructuredOutputs, token_ids: list[int], then_ends: bool = False
) -> bool:
    """Whether a fresh matcher of `spec` accepts every token (and with then_ends, allows EOS after them)."""
    matcher = backend.matcher(spec)
    if not all(matcher.accept(i) for i in token_ids):
        return False
    row = np.empty(backend.bitmask_words, dtype=np.int32)
    matcher.fill_bitmask(row)
    return not then_ends or bool(set(EOS) & set(allowed_tokens(row, backend.tokenizer.vocab_size).tolist()))
