"""The engine's constrained sequences: one matcher per sequence, kept in step with the sequence's
output tokens, and each step's bitmask computed on a worker thread while the model runs."""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import (
    EndingMatcher,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    fill_eos_only,
    grammar_failure_error,
)
from batchlm.structured.compiles import BackgroundCompiles
from batchlm.structured.step_masks import GrammarMasks, PrefetchedMasks, SampledRows

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _then(job: Callable[..., T], written: Callable[[], None], *args: object) -> T:
    """Run a mask job, then say the masks are written (also when it fails: a device may be waiting for
    them), before the job's future resolves."""
    try:
        return job(*args)
    finally:
        written()


@dataclass(eq=False)
class _Sequence:
    request_id: str
    matcher: GrammarMatcher
    # The sequence's output token ids (the runner's list, appended to as tokens are sampled).
    output_token_ids: list[int]
    # How many of them the matcher has accepted.
    num_accepted: int = 0


class GrammarFailures:
    """The sequences whose grammar failed (their matchers allow only EOS from then on), noted on the
    worker thread as the masks are made and taken by the runner with the step those masks serve, so
    that the request ends in an error that names the cause rather than as a plain stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failed: dict[str, str] = {}

    def note(self, request_id: str, reason: str) -> None:
        logger.warning("request %s: its grammar failed (%s); it ends", request_id, reason)
        with self._lock:
            self._failed.setdefault(request_id, grammar_failure_error(reason))

    def note_rejections(
        self, accepted: list[bool], sequences: Sequence[_Sequence], tokens: Sequence[object]
    ) -> None:
        """Note each sequence whose matcher did not take its new tokens (`tokens`, per row, for the
        message when the grammar itself is sound)."""
        if all(accepted):
            return
        for ok, seq, token in zip(accepted, sequences, tokens, strict=True):
            if not ok:
                self.note(seq.request_id, seq.matcher.failure or f"it rejected the sampled token(s) {token}")

    def take(self) -> dict[str, str]:
        """Request id -> the error that ends it, for the failures noted since the last take."""
        with self._lock:
            failed, self._failed = self._failed, {}
        return failed


class _PreparedBatch:
    """The sequences of one prefetch, in its row order, with their matchers prepared as a batch and
    the mask row of each request."""

    def __init__(self, backend: GrammarBackend, request_ids: list[str], sequences: list[_Sequence]) -> None:
        self.sequences = sequences
        self.matchers = backend.batch([seq.matcher for seq in sequences])
        self.index = dict(zip(request_ids, range(len(request_ids)), strict=True))


# Python's default is 5 ms: the mask worker, back from a wait on the device or from the Rust
# matcher, would often idle that long for the GIL while the engine thread runs Python.
GIL_SWITCH_INTERVAL_S = 0.0002


def hand_over_the_gil_sooner() -> None:
    """Let the mask worker take the GIL back from the engine thread within GIL_SWITCH_INTERVAL_S."""
    if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


class LazyBackend:
    """The grammar backend, built by the first caller (a compile thread or the engine thread). Not a
    method of ConstrainedSequences, so that the compiles holding it make no cycle with it."""

    def __init__(
        self,
        make_backend: Callable[[tuple[int, ...]], GrammarBackend],
        on_built: Callable[[], None] | None = None,
    ) -> None:
        """on_built: called once the backend is built."""
        self._make_backend = make_backend
        self._on_built = on_built
        self._backend: GrammarBackend | None = None
        self._lock = threading.Lock()

    def __call__(self, eos_token_ids: tuple[int, ...]) -> GrammarBackend:
        backend = self._backend
        if backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = self._make_backend(eos_token_ids)
                    if self._on_built is not None:
                        self._on_built()
                backend = self._backend
        return backend

    def built(self) -> GrammarBackend | None:
        return self._backend


class ConstrainedSequences:
    """Matchers of the running constrained sequences, by request id.

    A matcher follows its sequence's output tokens lazily: before each mask it accepts the tokens
    sampled since the last one. A sequence re-added after preemption starts a fresh matcher that
    accepts every token generated so far, so recompute never changes what the grammar allows.
    """

    def __init__(self, make_backend: Callable[[tuple[int, ...]], GrammarBackend]) -> None:
        self._backends = LazyBackend(make_backend, hand_over_the_gil_sooner)
        self._compiles: BackgroundCompiles | None = None
        self._sequences: dict[str, _Sequence] = {}
        self._worker: ThreadPoolExecutor | None = None
        # The matchers of the last prefetch's sequences, prepared as a batch (worker thread only).
        self._batch: _PreparedBatch | None = None
        self.failures = GrammarFailures()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._sequences

    def __len__(self) -> int:
        return len(self._sequences)

    def add(
        self,
        request_id: str,
        spec: StructuredOutputs,
        output_token_ids: list[int],
        eos_token_ids: Sequence[int],
    ) -> None:
        """Start a sequence's matcher; `output_token_ids` is the list the runner keeps appending to."""
        backend = self._backend_for(tuple(eos_token_ids))
        matcher: GrammarMatcher
        try:
            matcher = backend.matcher(spec)
        except GrammarError as exc:
            # The API edge compiles every spec first; this is a grammar only this tokenizer rejects.
            matcher = EndingMatcher(backend.eos_token_ids, str(exc))
            self.failures.note(request_id, str(exc))
        self._sequences[request_id] = _Sequence(request_id, matcher, output_token_ids)

    def drop(self, request_ids: Sequence[str] | frozenset[str]) -> None:
        for request_id in request_ids:
            self._sequences.pop(request_id, None)
        if not self._sequences and self._worker is not None:
            # The last prefetch's prepared matchers are the worker's, let go of there (after any job
            # still running): kept, they held the ended requests' matchers while no grammar ran.
            self._worker.submit(self._forget_batch)

    def _forget_batch(self) -> None:
        self._batch = None

    @property
    def bitmask_words(self) -> int:
        """The width of a bitmask row (once a sequence has been added)."""
        assert self._backend is not None
        return self._backend.bitmask_words

    def rows_among(self, request_ids: Sequence[str]) -> list[int]:
        """The indexes of the request ids that are constrained sequences here."""
        known = self._sequences
        return [row for row, request_id in enumerate(request_ids) if request_id in known]

    def holds_all(self, request_ids: Sequence[str]) -> bool:
        """Whether every one of these sequences is still here (none dropped)."""
        known = self._sequences
        return all(request_id in known for request_id in request_ids)

    def tokens_known(self, request_ids: Sequence[str]) -> bool:
        """True when none of these sequences waits for a token still being sampled."""
        for request_id in request_ids:
            tokens = self._sequences[request_id].output_token_ids
            if tokens and tokens[-1] == PLACEHOLDER_TOKEN_ID:
                return False
        return True

    def start_masks(self, rows: Sequence[tuple[int, str]]) -> Future[GrammarMasks]:
        """Compute the masks of (batch row, request id) pairs on the worker thread. The sequences'
        tokens must be known (tokens_known) and must not change until the result is read."""
        assert self._backend is not None
        sequences = [self._sequences[request_id] for _, request_id in rows]
        # The slices are taken here, on the caller's thread, which owns the token lists.
        new_tokens = [seq.output_token_ids[seq.num_accepted :] for seq in sequences]
        for seq, tokens in zip(sequences, new_tokens, strict=True):
            seq.num_accepted += len(tokens)
        batch_rows = tuple(row for row, _ in rows)
        return self._submit(self._compute, self._backend, batch_rows, sequences, new_tokens)

    def _compute(
        self,
        backend: GrammarBackend,
        rows: tuple[int, ...],
        sequences: list[_Sequence],
        new_tokens: list[list[int]],
    ) -> GrammarMasks:
        self._batch = None  # its matchers move here: a failure here would not reach its prepared rows
        matchers = [seq.matcher for seq in sequences]
        bitmask = np.empty((len(rows), backend.bitmask_words), dtype=np.int32)
        accepted = self._guarded(
            backend, sequences, bitmask, lambda: backend.advance_and_fill(matchers, new_tokens, bitmask)
        )
        self.failures.note_rejections(accepted, sequences, new_tokens)
        return GrammarMasks(rows, bitmask)

    def prefetch_masks(
        self,
        sampled_rows: SampledRows,
        sampled: Callable[[], Sequence[int] | None],
        out: np.ndarray,
        written: Callable[[], None] | None = None,
    ) -> Future[PrefetchedMasks]:
        """Compute the next step's masks for these sequences on the worker thread, as soon as
        `sampled()` (called there; it waits for the launched step) gives the step's token ids, so that
        the masks overlap the host's scheduling and the device's next forward pass instead of
        following them. out: [>= rows, words] int32 to fill (pinned memory on a GPU). written: called
        on the worker thread once `out` holds the masks, or once the job has failed.

        Until the result is read, no other method may be called for these sequences."""
        assert self._backend is not None
        known = self._sequences
        found = [known.get(request_id) for request_id in sampled_rows.request_ids]
        sequences = [seq for seq in found if seq is not None]
        if len(sequences) < len(found):  # dropped since the step was launched
            sampled_rows = sampled_rows.only([i for i, seq in enumerate(found) if seq is not None])
        job = self._prefetch
        if written is not None:
            job = functools.partial(_then, self._prefetch, written)
        return self._submit(job, self._backend, sampled_rows, sequences, sampled, out)

    def _prefetch(
        self,
        backend: GrammarBackend,
        sampled_rows: SampledRows,
        sequences: list[_Sequence],
        sampled: Callable[[], Sequence[int] | None],
        out: np.ndarray,
    ) -> PrefetchedMasks:
        if [seq.num_accepted for seq in sequences] == sampled_rows.positions:
            return self._prefetch_one_each(backend, sampled_rows, sequences, sampled, out)
        token_ids = sampled()
        if token_ids is None:
            return PrefetchedMasks({}, out[:0])
        tokens = [token_ids[row] for row in sampled_rows.rows]
        self._batch = None
        index: dict[str, int] = {}
        taking: list[_Sequence] = []
        new_tokens: list[list[int]] = []
        for request_id, position, seq, token_id in zip(
            sampled_rows.request_ids, sampled_rows.positions, sequences, tokens, strict=True
        ):
            earlier = seq.output_token_ids[seq.num_accepted : position]
            if PLACEHOLDER_TOKEN_ID in earlier or seq.num_accepted > position:
                continue  # tokens still in flight before this one: the step computes its mask itself
            new_tokens.append([*earlier, token_id])
            seq.num_accepted = position + 1
            index[request_id] = len(taking)
            taking.append(seq)
        bitmask = out[: len(taking)]
        if taking:
            matchers = [seq.matcher for seq in taking]
            accepted = self._guarded(
                backend, taking, bitmask, lambda: backend.advance_and_fill(matchers, new_tokens, bitmask)
            )
            self.failures.note_rejections(accepted, taking, new_tokens)
        return PrefetchedMasks(index, bitmask, complete=len(taking) == len(sequences))

    def _prefetch_one_each(
        self,
        backend: GrammarBackend,
        sampled_rows: SampledRows,
        sequences: list[_Sequence],
        sampled: Callable[[], Sequence[int] | None],
        out: np.ndarray,
    ) -> PrefetchedMasks:
        """_prefetch where every sequence takes exactly the one token sampled for it, as in steady
        decoding: the batch of matchers prepared last time serves again while the sequences stay the
        same. All but the step itself is done before the tokens land (the worker would wait anyway), so
        that after they land only the backend's call holds up the masks."""
        batch = self._batch
        if batch is None or batch.sequences != sequences:
            batch = self._batch = _PreparedBatch(backend, sampled_rows.request_ids, sequences)
        rows = sampled_rows.rows
        for seq in sequences:
            seq.num_accepted += 1
        bitmask = out[: len(sequences)]
        leading = rows == list(range(len(rows)))  # the sampled rows' first tokens, in order
        token_ids = sampled()
        if token_ids is None:  # they travel packed with logprobs: the step computes its masks itself
            for seq in sequences:
                seq.num_accepted -= 1
            return PrefetchedMasks({}, out[:0])
        tokens = list(token_ids[: len(rows)]) if leading else [token_ids[row] for row in rows]
        if sequences:
            accepted = self._guarded(
                backend, sequences, bitmask, lambda: batch.matchers.step(tokens, bitmask)
            )
            self.failures.note_rejections(accepted, sequences, tokens)
        return PrefetchedMasks(batch.index, bitmask, complete=True)

    def _guarded(
        self,
        backend: GrammarBackend,
        sequences: list[_Sequence],
        bitmask: np.ndarray,
        step: Callable[[], list[bool]],
    ) -> list[bool]:
        """`step` (the backend advancing these sequences' matchers and filling their mask rows), or,
        when the grammar engine raises instead, those sequences failed: each ends in an error naming
        it, while the engine and every other sequence go on (raised, it would stop the engine). The
        batch call gives no way to tell which row raised, nor where the others' matchers stand."""
        try:
            return step()
        except Exception as exc:
            logger.exception("the grammar engine failed on %d sequence(s)", len(sequences))
            reason = f"the grammar engine raised {type(exc).__name__}: {exc}"
            self._batch = None  # it holds the failed matchers
            for row, seq in enumerate(sequences):
                seq.matcher = EndingMatcher(backend.eos_token_ids, reason)
                fill_eos_only(bitmask[row], backend.eos_token_ids)
                self.failures.note(seq.request_id, reason)
            return [True] * len(sequences)

    def _submit(self, job: Callable[..., T], *args: object) -> Future[T]:
        """Run a mask job on the one worker thread (jobs run in submission order)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        return self._worker.submit(job, *args)

    def compute_masks(self, rows: Sequence[tuple[int, str]]) -> GrammarMasks:
        """start_masks, waited for."""
        return self.start_masks(rows).result()

    def _backend_for(self, eos_token_ids: tuple[int, ...]) -> GrammarBackend:
        return self._backends(eos_token_ids)

    @property
    def _backend(self) -> GrammarBackend | None:
        """The backend, once built (by `add` or by a compile thread)."""
        return self._backends.built()

    @property
    def compiles(self) -> BackgroundCompiles:
        """The compiles of the grammars of requests the engine core holds back until theirs is ready
        (so that `add` finds it compiled)."""
        return self.make_compiles()

    def make_compiles(self, notify: Callable[[], None] | None = None) -> BackgroundCompiles:
        """`compiles`, made on first call; notify: as BackgroundCompiles takes it (first call only)."""
        if self._compiles is None:
            self._compiles = BackgroundCompiles(self._backends, self._backends.built, notify=notify)
        return self._compiles

    def close(self) -> None:
        if self._compiles is not None:
            self._compiles.close()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
