"""Advancing a step's matchers: on llguidance's threads in one call per token depth (beside a GPU) or
one call per token (a CPU engine), to the same states, with a rejected token reported per matcher."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarMatcher, allowed_tokens
from batchlm.structured.llguidance_backend import LLGuidanceBackend

EOS = (1, 3)
VOCAB = 2080
SPEC = StructuredOutputs(
    json=json.dumps(
        {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
            "required": ["name", "n"],
            "additionalProperties": False,
        }
    )
)


def backend_of(tiny_tokenizer: Any, batched: bool) -> LLGuidanceBackend:
    return LLGuidanceBackend.from_hf(tiny_tokenizer.hf, VOCAB, EOS, threads=2, batched_accept=batched)


def random_paths(backend: LLGuidanceBackend, count: int, length: int) -> list[list[int]]:
    """Token paths the grammar allows, each walked by a matcher of its own."""
    rng = np.random.default_rng(0)
    row = np.empty(backend.bitmask_words, dtype=np.int32)
    paths = []
    for _ in range(count):
        matcher, path = backend.matcher(SPEC), []
        for _ in range(length):
            matcher.fill_bitmask(row)
            token = int(rng.choice(allowed_tokens(row, VOCAB)))
            assert matcher.accept(token)
            path.append(token)
        paths.append(path)
    return paths


def masks(backend: LLGuidanceBackend, matchers: list[GrammarMatcher]) -> np.ndarray:
    bitmask = np.empty((len(matchers), backend.bitmask_words), dtype=np.int32)
    backend.fill_bitmasks(matchers, bitmask)
    return bitmask


@pytest.mark.parametrize("batched", [False, True])
def test_advance_reaches_the_states_of_accepting_one_by_one(tiny_tokenizer: Any, batched: bool) -> None:
    backend = backend_of(tiny_tokenizer, batched)
    paths = random_paths(backend, count=6, length=9)
    reference = [backend.matcher(SPEC) for _ in paths]
    for matcher, path in zip(reference, paths, strict=True):
        for token in path:
            assert matcher.accept(token)
    matchers = [backend.matcher(SPEC) for _ in paths]
    taken = [0] * len(paths)
    # Uneven steps: some matchers take several tokens at once, some none.
    for cut in (1, 3, 4, 8, 10):
        ends = [min(9, cut - 1 if i % 3 == 0 else cut) for i in range(len(paths))]
        new_tokens = [path[start:end] for path, start, end in zip(paths, taken, ends, strict=True)]
        assert backend.advance(matchers, new_tokens) == [True] * len(matchers)
        taken = ends
    assert taken == [len(path) for path in paths]
    assert np.array_equal(masks(backend, matchers), masks(backend, reference))


@pytest.mark.parametrize("batched", [False, True])
def test_a_rejected_token_is_reported_for_its_matcher_alone(tiny_tokenizer: Any, batched: bool) -> None:
    backend = backend_of(tiny_tokenizer, batched)
    matchers = [backend.matcher(SPEC) for _ in range(3)]
    row = np.empty(backend.bitmask_words, dtype=np.int32)
    matchers[0].fill_bitmask(row)
    allowed = allowed_tokens(row, VOCAB)
    forbidden = int(np.setdiff1d(np.arange(VOCAB), allowed)[0])
    first = int(allowed[0])
    assert backend.advance(matchers, [[first], [forbidden], []]) == [True, False, True]
    assert backend.advance(matchers, [[], [], [first]]) == [True, True, True]


def non_eos_or_eos(row: np.ndarray) -> list[int]:
    allowed = allowed_tokens(row, VOCAB).tolist()
    return [t for t in allowed if t not in EOS] or allowed


@pytest.mark.parametrize("batched", [False, True])
def test_a_prepared_batch_steps_as_its_matchers_do_one_at_a_time(tiny_tokenizer: Any, batched: bool) -> None:
    """Rows of two grammars (so of several templates), one token each per step, through one batch
    prepared at the start: the same masks as matchers driven alone, and a rejected token ends its row."""
    backend = backend_of(tiny_tokenizer, batched)
    specs = [SPEC, StructuredOutputs(regex="[a-z]{1,30}")] * 3
    matchers = [backend.matcher(spec) for spec in specs]
    references = [backend.matcher(spec) for spec in specs]
    batch = backend.batch(matchers)
    rng = np.random.default_rng(1)
    bitmask = np.empty((len(specs), backend.bitmask_words), dtype=np.int32)
    for step in range(8):
        batch.fill(bitmask)
        assert np.array_equal(bitmask, masks(backend, references)), step
        tokens = [int(rng.choice(non_eos_or_eos(row))) for row in bitmask]
        bad_row = 4 if step == 5 else None
        if bad_row is not None:
            tokens[bad_row] = int(np.setdiff1d(np.arange(VOCAB), allowed_tokens(bitmask[bad_row], VOCAB))[0])
        assert batch.advance_one(tokens) == [row != bad_row for row in range(len(specs))]
        for row, (reference, token) in enumerate(zip(references, tokens, strict=True)):
            if row != 4 or step < 5:
                assert reference.accept(token)
        if bad_row is not None:
            references[bad_row] = matchers[bad_row]  # from here on it allows EOS alone
    batch.fill(bitmask)
    assert set(allowed_tokens(bitmask[4], VOCAB).tolist()) == set(EOS)
