"""The mlx backend's grammar logits processor on its own (mlx.core, no model): a grammar engine that
raises fails its request alone, as one whose grammar rejects a token does."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")

import mlx.core as mx

from batchlm.backends.mlx.grammar import GrammarProcessor

VOCAB = 40
EOS = (2,)


class RaisingMatcher:
    """Allows every token until its second one, then raises as a broken grammar engine would."""

    failure: str | None = None
    is_terminated = False

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def accept(self, token_id: int) -> bool:
        if self.accepted:
            raise RuntimeError("injected matcher failure")
        self.accepted.append(token_id)
        return True

    def fill_bitmask(self, row: np.ndarray) -> None:
        row[:] = -1


def test_a_grammar_engine_that_raises_leaves_only_eos_and_names_the_failure() -> None:
    processor = GrammarProcessor(RaisingMatcher(), prompt_len=2, bitmask_words=2, eos_token_ids=EOS)
    logits = mx.zeros((1, VOCAB))
    first = processor(mx.array([7, 8, 5]), logits)
    assert bool(mx.all(first == 0)) and processor.failure is None
    masked = np.asarray(processor(mx.array([7, 8, 5, 6]), logits))[0]
    assert list(np.flatnonzero(masked == 0)) == list(EOS)
    assert processor.failure == "the grammar engine raised RuntimeError: injected matcher failure"
    # It stays so: the loop ends the request with the reason at this step's output.
    again = np.asarray(processor(mx.array([7, 8, 5, 6, 2]), logits))[0]
    assert list(np.flatnonzero(again == 0)) == list(EOS)
