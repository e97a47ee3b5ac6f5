"""The tokens a user's grammar names (special tokens, token ids), checked at the API edge against the
model's tokenizer, as validated_grammar's tokenizer-free check cannot: a grammar naming one the
tokenizer lacks is then a 400, not a request the engine ends at once."""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

import llguidance

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.llguidance_backend import llguidance_tokenizer
from batchlm.structured.spec_grammar import compile_error, validated_grammar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# How a Lark grammar names tokens of the tokenizer: <|special|>, <[id]> or <[first-last]>.
TOKEN_REFERENCE = re.compile(r"<\||<\[")


class GrammarTokenCheck:
    """llguidance's view of the tokenizer is built on the first grammar that names tokens (a fraction
    of a second for a large vocabulary); other grammars never need it."""

    def __init__(self, hf: PreTrainedTokenizerBase, vocab_size: int) -> None:
        self._hf = hf
        self._vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def __call__(self, spec: StructuredOutputs) -> None:
        """Raises GrammarError naming the token the tokenizer lacks."""
        if spec.grammar is None or not TOKEN_REFERENCE.search(spec.grammar):
            return
        error = llguidance.LLMatcher.validate_grammar(validated_grammar(spec), self._llguidance_tokenizer())
        if error:
            raise compile_error(spec, error)

    def _llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance_tokenizer(self._hf, self._vocab_size)
            return self._tokenizer
