"""Structured outputs on the mlx backend: a logits processor per constrained request that masks the
tokens its grammar forbids (mlx-lm runs processors one request at a time)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from batchlm.outputs import EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.structured.backend import EndingMatcher, GrammarMatcher
from batchlm.structured.compiles import BackgroundCompiles
from batchlm.structured.factory import BackendFactory
from batchlm.structured.sequences import LazyBackend

logger = logging.getLogger(__name__)


class GrammarProcessor:
    """Follows the request's output (the context past the prompt) with its matcher and masks the logits.
    Goes first among the processors, so logprobs and the other processors see the masked distribution."""

    def __init__(
        self,
        matcher: GrammarMatcher,
        prompt_len: int,
        bitmask_words: int,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self._matcher = matcher
        self._prompt_len = prompt_len
        self._num_accepted = 0
        self._row = np.empty(bitmask_words, dtype=np.int32)
        # What a matcher whose grammar engine raised allows: the request ends, with the reason.
        self._eos_token_ids = eos_token_ids

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        """context: [T] prompt then output ids; logits: [1, V]."""
        start = self._prompt_len + self._num_accepted
        new_tokens: list[int] = np.asarray(context[start:]).tolist()
        self._num_accepted = max(0, context.size - self._prompt_len)
        try:
            for token_id in new_tokens:
                self._matcher.accept(token_id)
            self._matcher.fill_bitmask(self._row)
        except Exception as exc:  # raised out of the step, it would end every request in the batch
            logger.exception("the grammar engine failed")
            reason = f"the grammar engine raised {type(exc).__name__}: {exc}"
            self._matcher = EndingMatcher(self._eos_token_ids, reason)
            self._matcher.fill_bitmask(self._row)
        vocab_size = logits.shape[-1]
        allowed = np.unpackbits(self._row.view(np.uint8), bitorder="little")[:vocab_size]  # [V]
        return mx.where(mx.array(allowed.astype(np.bool_))[None], logits, -float("inf"))

    @property
    def failure(self) -> str | None:
        """Why the grammar failed (its mask then allows only EOS), or None."""
        return self._matcher.failure


class MLXGrammars:
    """Makes each constrained request's processor; the backend is built on the first one. Grammars are
    compiled ahead, on the compiles' threads (`compiles`), so that the loop's step only copies them."""

    def __init__(self, make_backend: BackendFactory, wake: Callable[[], None] | None = None) -> None:
        self._backend = LazyBackend(make_backend)
        self.compiles = BackgroundCompiles(self._backend, self._backend.built, notify=wake)

    def processors_for(self, request: EngineCoreRequest) -> list[GrammarProcessor]:
        """[] for an unconstrained request. Raises GrammarError for a grammar that does not compile."""
        spec = request.sampling_params.structured_outputs
        if spec is None:
            return []
        backend = self._backend(request.eos_token_ids)
        matcher = backend.matcher(spec)
        prompt_len = len(request.prompt_token_ids)
        return [GrammarProcessor(matcher, prompt_len, backend.bitmask_words, backend.eos_token_ids)]


def grammar_processors(
    grammars: MLXGrammars | None, requests: Sequence[EngineCoreRequest]
) -> tuple[dict[str, list[GrammarProcessor]], list[EngineCoreOutput]]:
    """Each request's grammar processors (none when unconstrained), and ERROR outputs for the requests
    whose grammar does not compile, or that need a grammar from a loop built without a backend (only
    they fail)."""
    processors: dict[str, list[GrammarProcessor]] = {}
    failed = []
    for request in requests:
        try:
            if request.sampling_params.structured_outputs is not None and grammars is None:
                raise ValueError(
                    "structured outputs need a grammar backend, and this loop was built without one"
                )
            processors[request.request_id] = grammars.processors_for(request) if grammars is not None else []
        except ValueError as exc:
            message = f"the mlx backend could not start the request: {exc}"
            failed.append(
                EngineCoreOutput(request.request_id, (), finish_reason=FinishReason.ERROR, error=message)
            )
    return processors, failed
