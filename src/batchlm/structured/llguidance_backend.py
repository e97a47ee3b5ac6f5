"""The grammar backend on llguidance: a spec's grammar text (spec_grammar.py) compiled against the
model's tokenizer, with masks computed by its Rust matcher (the GIL is released while it works)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING

import llguidance
import numpy as np

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarMatcher, LRUCache, bitmask_words, fill_eos_only
from batchlm.structured.spec_grammar import compile_error, validated_grammar
from batchlm.structured.template_pool import TemplateBudget, TemplatePool

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Compiled grammars kept per backend.
CACHE_SIZE = 256
# How llguidance's errors from the lexer begin (a lexer is shared by copies of one compiled grammar).
LEXER_FAILURE = "lexer error"
# Sort key of the (family, ...) tuples a batch of rows is grouped by.
by_family = itemgetter(0)
# Compiled copies of a grammar per mask thread when there are several (see TemplatePool).
TEMPLATES_PER_THREAD = 4
# Templates beyond each cached grammar's first, in all: many grammars each used by many sequences do
# not multiply the compiled-grammar memory without bound.
EXTRA_TEMPLATES = 256

# Characters of a JSON string, as llguidance's own string slices spell them.
JSON_STRING_CHAR = r'[^"\\\x00-\x1F\x7F]'
# Lengths of the JSON-string slices added between llguidance's (at most 10 and 30 characters). Inside a
# string with a maxLength, a mask allows a whole slice at once only while the string may still hold that
# many characters; otherwise it walks the slice's tokens one by one. Lengths in between let more of the
# vocabulary be allowed whole as the bound nears (BENCHMARKS.md, "Token slices between llguidance's own").
EXTRA_STRING_SLICE_LENGTHS = (2, 4, 6, 8, 12, 15, 20, 25)


def token_slices(string_lengths: Sequence[int] = EXTRA_STRING_SLICE_LENGTHS) -> list[str]:
    """llguidance's general slices and JSON-string slices of at most each of `string_lengths`
    characters (masks are the same with any slices; only their cost changes)."""
    general = llguidance.LLTokenizer.general_slices()
    extra = [f"{JSON_STRING_CHAR}{{1,{n}}}" for n in string_lengths]
    return [*general, *(s for s in extra if s not in general)]


def llguidance_tokenizer(
    hf: PreTrainedTokenizerBase,
    vocab_size: int,
    eos_token_ids: Sequence[int] = (),
    slices: list[str] | None = None,
) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face tokenizer, its ids covering the model's logits width
    (vocab_size, which may pad past the tokenizer's)."""
    import llguidance.hf

    n_vocab = max(vocab_size, len(hf))
    eos = list(eos_token_ids) or None
    return llguidance.hf.from_tokenizer(hf, n_vocab=n_vocab, eos_token=eos, slices=slices)  # type: ignore[arg-type]


class LLGuidanceMatcher:
    """One sequence's llguidance matcher; `family` numbers the compiled template it was copied from
    (copies of one template share its lexer under one lock)."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        eos_token_ids: Sequence[int],
        family: int = 0,
        retire: Callable[[], None] | None = None,
    ) -> None:
        """retire: drops the compiled grammar this matcher was copied from (see retire_if_spent)."""
        self.inner = matcher
        self.family = family
        self._eos_token_ids = tuple(eos_token_ids)
        self._retire = retire

    def fill_bitmask(self, row: np.ndarray) -> None:
        if self.inner.is_error():
            self.fill_eos_only(row)
            return
        self.inner.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def fill_eos_only(self, row: np.ndarray) -> None:
        """A matcher that has gone wrong ends its sequence rather than leaving it unconstrained."""
        fill_eos_only(row, self._eos_token_ids)

    def accept(self, token_id: int) -> bool:
        if self.inner.consume_token(token_id):
            return True
        self.retire_if_spent()
        return False

    def retire_if_spent(self) -> None:
        """Copies of a template share its lexer, and a lexer past its limit fails every copy, those made
        later included: a matcher failing there retires the compiled grammar, so that the next request
        of it gets a fresh one rather than failing at its start."""
        if self._retire is not None and LEXER_FAILURE in (self.failure or ""):
            self._retire()
            self._retire = None

    @property
    def is_terminated(self) -> bool:
        return bool(self.inner.is_stopped())

    @property
    def failure(self) -> str | None:
        if not self.inner.is_error():
            return None
        # The first line: the rest is the parser's state, long and of no use to a client.
        return str(self.inner.get_error()).strip().split("\n", 1)[0]


class LLGuidanceBackend:
    """Compiles specs against one tokenizer; a compiled grammar is kept (by spec.key) as a pool of
    pristine matchers that new sequences deep-copy."""

    def __init__(
        self,
        tokenizer: llguidance.LLTokenizer,
        eos_token_ids: Sequence[int],
        threads: int = 1,
        batched_accept: bool = False,
    ) -> None:
        """batched_accept: advance the matchers on the executor's threads, without the GIL, instead of
        one call per token (BENCHMARKS.md: no faster on a 2-core CPU; beside a GPU the engine thread
        holds the GIL for most of the step, and each of those calls was measured waiting for it)."""
        self.tokenizer = tokenizer
        self.batched_accept = batched_accept
        self.eos_token_ids = tuple(eos_token_ids)
        self.bitmask_words = bitmask_words(tokenizer.vocab_size)
        # One thread gains nothing from copies that do not share a lock.
        self.templates_per_grammar = 1 if threads == 1 else threads * TEMPLATES_PER_THREAD
        self._budget = TemplateBudget(EXTRA_TEMPLATES)
        self._compiled: LRUCache[tuple[str, str], TemplatePool] = LRUCache(CACHE_SIZE, TemplatePool.release)
        self._lock = threading.Lock()
        # Set once grammars are compiled ahead, off the engine thread: copies then never compile.
        self._prepared_ahead = False
        self._executor = llguidance.LLExecutor(num_threads=threads)

    @classmethod
    def from_hf(
        cls,
        hf: PreTrainedTokenizerBase,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        threads: int = 1,
        batched_accept: bool = False,
    ) -> LLGuidanceBackend:
        """vocab_size: the model's logits width; the masks cover at least that many ids."""
        tokenizer = llguidance_tokenizer(hf, vocab_size, eos_token_ids, token_slices())
        return cls(tokenizer, eos_token_ids or tokenizer.eos_tokens, threads, batched_accept)

    @property
    def compiled_cache(self) -> LRUCache[tuple[str, str], TemplatePool]:
        return self._compiled

    def matcher(self, spec: StructuredOutputs) -> LLGuidanceMatcher:
        pool = self._pool(spec)
        with self._lock:
            inner, family = pool.copy(grow_on_copy=not self._prepared_ahead)
        return LLGuidanceMatcher(
            inner, self.eos_token_ids, family, functools.partial(self._retire, spec, pool)
        )

    def _retire(self, spec: StructuredOutputs, pool: TemplatePool) -> None:
        """Drop a compiled grammar whose lexer is spent (unless it was dropped and compiled anew)."""
        with self._lock:
            self._compiled.discard(spec.key, pool)

    def compiled(self, spec: StructuredOutputs) -> bool:
        """Whether the spec's grammar is in the cache (a matcher of it is a copy)."""
        with self._lock:
            return spec.key in self._compiled

    def can_grow(self, spec: StructuredOutputs) -> bool:
        """Whether `prepare` would add a template to the spec's compiled grammar (room in its pool and
        in the budget)."""
        with self._lock:
            pool = self._compiled.get(spec.key)
            return pool is not None and pool.has_room()

    def prepare(self, spec: StructuredOutputs) -> None:
        """Compile the spec's grammar into the cache, or, when it is there, one more template of it (while
        the pool and budget have room), off the engine thread (structured/compiles.py). From the first
        call on, making a matcher never compiles an extra template: that is left to these calls, so that
        a step never waits for a compile. Raises GrammarError."""
        self._prepared_ahead = True
        with self._lock:
            pool = self._compiled.get(spec.key)
            grows = pool is not None and pool.take_room()
        if pool is None:
            self._pool(spec)
            return
        if not grows:
            return
        try:
            template = pool.compile_one()
        except BaseException:
            with self._lock:
                pool.give_back()
            raise
        with self._lock:
            pool.add(template)

    def _pool(self, spec: StructuredOutputs) -> TemplatePool:
        """The spec's pool of templates, compiled now if not cached. The compile runs outside the lock,
        so that a matcher of a cached grammar is never held up by another grammar's compile."""
        with self._lock:
            pool = self._compiled.get(spec.key)
        if pool is not None:
            return pool
        made = TemplatePool(lambda: self._compile(spec), self.templates_per_grammar, self._budget)
        with self._lock:
            pool = self._compiled.get_or_make(spec.key, lambda: made)
        if pool is not made:  # compiled meanwhile by another thread: its extra templates are none
            made.release()
        return pool

    def _compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, validated_grammar(spec), log_level=0)
        if matcher.is_error():
            raise compile_error(spec, matcher.get_error())
        return matcher

    def batch(self, matchers: Sequence[GrammarMatcher]) -> LLGuidanceBatch:
        return LLGuidanceBatch(self, matchers)

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher], bitmask: np.ndarray) -> None:
        """bitmask: [rows, bitmask_words] int32, C-contiguous; row i for matchers[i]."""
        self.batch(matchers).fill(bitmask)

    def advance_and_fill(
        self, matchers: Sequence[GrammarMatcher], new_tokens: Sequence[Sequence[int]], bitmask: np.ndarray
    ) -> list[bool]:
        accepted = self.advance(matchers, new_tokens)
        self.fill_bitmasks(matchers, bitmask)
        return accepted

    def advance(self, matchers: Sequence[GrammarMatcher], new_tokens: Sequence[Sequence[int]]) -> list[bool]:
        """matchers[i] over new_tokens[i]; per matcher, False if its grammar rejected a token. One
        batch per token depth, of the matchers with a token there (a matcher at most once per call)."""
        accepted = [True] * len(matchers)
        for depth in range(max(map(len, new_tokens), default=0)):
            rows = [row for row, tokens in enumerate(new_tokens) if depth < len(tokens)]
            batch = self.batch([matchers[row] for row in rows])
            results = batch.advance_one([new_tokens[row][depth] for row in rows])
            for row, ok in zip(rows, results, strict=True):
                accepted[row] = ok and accepted[row]
        return accepted


class LLGuidanceBatch:
    """Matchers as the rows of a decode batch, prepared once: the healthy llguidance rows grouped by
    template (neighbours share one lexer lock, so a thread's run of rows takes it once) and paired
    as the executor takes them. A step then holds the GIL for a few list operations, not for Python
    per row, which beside a busy engine thread waits its turn at every switch (BENCHMARKS.md)."""

    def __init__(self, backend: LLGuidanceBackend, matchers: Sequence[GrammarMatcher]) -> None:
        self._backend = backend
        self._executor = backend._executor
        self.matchers = list(matchers)
        self._prepare()

    def _prepare(self) -> None:
        ours = [
            (matcher.family, row, matcher)
            for row, matcher in enumerate(self.matchers)
            if isinstance(matcher, LLGuidanceMatcher) and not matcher.inner.is_error()
        ]
        ours.sort(key=by_family)
        self._rows = [row for _, row, _ in ours]
        self._ours = [matcher for _, _, matcher in ours]
        self._inners = [matcher.inner for matcher in self._ours]
        self._mask_rows = [(matcher.inner, row) for _, row, matcher in ours]
        in_executor = set(self._rows)
        # Failed matchers (they allow EOS alone) and matchers of other kinds go one at a time.
        self._others = [row for row in range(len(self.matchers)) if row not in in_executor]

    def advance_one(self, token_ids: list[int]) -> list[bool]:
        accepted = [True] * len(self.matchers)
        if self._rows:
            tokens = [token_ids[row] for row in self._rows]
            if self._backend.batched_accept:
                results = self._executor.consume_token_par(list(zip(self._inners, tokens, strict=True)))
            else:
                results = [
                    inner.consume_token(token) for inner, token in zip(self._inners, tokens, strict=True)
                ]
            if not all(results):
                for row, matcher, ok in zip(self._rows, self._ours, results, strict=True):
                    accepted[row] = bool(ok)
                    if not ok:
                        matcher.retire_if_spent()
                self._prepare()  # the rejecting matchers are in error now: they leave the executor's rows
        for row in self._others:
            accepted[row] = self.matchers[row].accept(token_ids[row]) and accepted[row]
        return accepted

    def step(self, token_ids: list[int], bitmask: np.ndarray) -> list[bool]:
        accepted = self.advance_one(token_ids)
        self.fill(bitmask)
        return accepted

    def fill(self, bitmask: np.ndarray) -> None:
        assert bitmask.dtype == np.int32 and bitmask.flags["C_CONTIGUOUS"]
        assert bitmask.shape == (len(self.matchers), self._backend.bitmask_words)
        for row in self._others:
            self.matchers[row].fill_bitmask(bitmask[row])
        if self._mask_rows:
            row_bytes = self._backend.bitmask_words * 4
            self._executor.unsafe_compute_mask_ptr(
                self._mask_rows, bitmask.ctypes.data, row_bytes, bitmask.shape[0]
            )
