"""The runner's side of structured outputs: its constrained sequences, which rows of a sampled batch
they are, and when each step's masks are computed."""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchlm.config import EngineConfig
from batchlm.runner.host_flag import StreamFlag
from batchlm.runner.step_output import PendingStepOutput
from batchlm.sampling.sampler import Sampler
from batchlm.structured.factory import backend_factory
from batchlm.structured.sequences import ConstrainedSequences
from batchlm.structured.step_masks import GrammarMasks, PrefetchedMasks, SampledRows

# Rows -> scratch of that many bitmask rows (pinned memory on a GPU, so the upload needs no copy).
MaskBuffer = Callable[[int], np.ndarray]


class MaskBuffers:
    """The runner's MaskBuffer. (Not a method of the runner: StepMasks would then hold the runner, a
    cycle that only the cyclic collector frees, and never once a serving process froze it.)"""

    def __init__(self, sampler: Sampler, sequences: ConstrainedSequences) -> None:
        self._sampler = sampler
        self._sequences = sequences

    def __call__(self, rows: int) -> np.ndarray:
        words = self._sequences.bitmask_words
        staging = self._sampler.grammar_staging(words)
        if staging is None:
            return np.empty((rows, words), dtype=np.int32)
        return staging.buffer(rows)


def constrained_sequences(
    config: EngineConfig, model_dir: Path, vocab_size: int, on_accelerator: bool
) -> ConstrainedSequences:
    return ConstrainedSequences(backend_factory(config, model_dir, vocab_size, on_accelerator))


def constrained_rows(
    sequences: ConstrainedSequences, request_ids: tuple[str, ...]
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The batch rows and request ids of the constrained sequences among a step's sampled rows."""
    if not len(sequences):
        return (), ()
    rows = sequences.rows_among(request_ids)
    if len(rows) == len(request_ids):
        return tuple(rows), request_ids
    return tuple(rows), tuple(request_ids[row] for row in rows)


def sampled_rows(
    batch_rows: Sequence[int], request_ids: Sequence[str], positions: Sequence[int]
) -> SampledRows:
    """The constrained rows of a launched step, with where each row's token lands in its sequence."""
    if len(batch_rows) < len(positions):  # else every sampled row is constrained: rows 0..n-1
        positions = [positions[row] for row in batch_rows]
    return SampledRows(list(request_ids), list(batch_rows), list(positions))


def merge_masks(
    rows: Sequence[tuple[int, str]],
    ahead: PrefetchedMasks | None,
    computed: GrammarMasks | None,
    out: np.ndarray,
) -> GrammarMasks:
    """One step's masks in batch-row order, from masks prefetched by request id and masks computed
    now (`computed` holds the rows `ahead` lacks). out: [>= len(rows), words] scratch to gather into."""
    batch_rows = tuple(row for row, _ in rows)
    request_ids = [request_id for _, request_id in rows]
    if ahead is None:
        assert computed is not None
        return computed
    if computed is None and list(ahead.index)[: len(rows)] == request_ids:
        return GrammarMasks(batch_rows, ahead.bitmask[: len(rows)])  # the same sequences, in order
    sources = ahead.bitmask
    computed_at: dict[int, int] = {}  # batch row -> its row in `sources`
    if computed is not None:
        computed_at = {row: len(ahead.bitmask) + i for i, row in enumerate(computed.rows)}
        sources = np.concatenate([ahead.bitmask, computed.bitmask])
    picks = [
        ahead.index[request_id] if request_id in ahead.index else computed_at[row] for row, request_id in rows
    ]
    gathered = out[: len(rows)]
    np.take(sources, picks, axis=0, out=gathered)
    return GrammarMasks(batch_rows, gathered)


@dataclass
class PrefetchJob:
    """Masks being computed ahead of a step on the mask worker, and what the engine thread knows of
    them without waiting."""

    future: Future[PrefetchedMasks]
    # The sequences in mask-row order, and where each one's token lands.
    request_ids: tuple[str, ...]
    positions: tuple[int, ...]
    # Where the worker writes them: [len(request_ids), words] int32 (pinned on a GPU).
    bitmask: np.ndarray
    # The flag value the worker releases once `bitmask` is written (0: no flag).
    ticket: int
    # Every sequence is advanced through its sampled token, so row i is request_ids[i]'s mask: known
    # from the job before it (the same sequences, each one token on) or seen in this job's result.
    complete: bool
    # Sequences dropped (finished) since: their rows must not serve a later request of the same id.
    dropped: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StartedMasks:
    """A step's masks as they stood before its forward pass."""

    # The step's constrained rows (ascending) and their request ids.
    batch_rows: tuple[int, ...]
    request_ids: tuple[str, ...]
    # Started now, the rows' tokens being known; or prefetched by the previous step.
    started: Future[GrammarMasks] | None
    prefetched: PrefetchJob | None

    @property
    def rows(self) -> list[tuple[int, str]]:
        """(batch row, request id) pairs."""
        return list(zip(self.batch_rows, self.request_ids, strict=True))


class StepMasks:
    """When a step's grammar masks are computed, so they overlap the forward pass: started before it
    when the rows' tokens are known; under async scheduling, prefetched by the previous step as soon
    as its tokens land (`ConstrainedSequences.prefetch_masks`); the rows neither covers, after
    waiting for their tokens.

    With a stream flag (a GPU), a step whose masks are a complete prefetch of the same sequences is
    sampled without the engine thread waiting for them: its mask upload and sampling are queued behind
    a wait on the flag, which the worker releases once the masks are written."""

    def __init__(
        self,
        sequences: ConstrainedSequences,
        buffer: MaskBuffer,
        flag: StreamFlag | None = None,
    ) -> None:
        self.sequences = sequences
        self._buffer = buffer
        self._flag = flag
        self._prefetched: PrefetchJob | None = None
        self._last_ticket = 0
        # Jobs whose masks the device waits for, not yet seen to finish (their failures raise later).
        self._handed_to_device: list[PrefetchJob] = []
        # Steps sampled behind the flag so far.
        self.steps_handed_to_device = 0

    def start(self, request_ids: tuple[str, ...]) -> StartedMasks:
        """Before the forward pass. Takes the previous step's prefetch, if any."""
        batch_rows, constrained = constrained_rows(self.sequences, request_ids)
        prefetched, self._prefetched = self._prefetched, None
        started = None
        if constrained and prefetched is None and self.sequences.tokens_known(constrained):
            self.settle()  # the matchers must be the worker's no longer
            started = self.sequences.start_masks(list(zip(batch_rows, constrained, strict=True)))
        return StartedMasks(batch_rows, constrained, started, prefetched)

    def result(self, step: StartedMasks, wait_for_tokens: Callable[[], None]) -> GrammarMasks | None:
        """The step's masks; `wait_for_tokens` makes every launched step's tokens real. With a flag and
        a complete prefetch, the masks' buffer as the worker will fill it, behind a wait queued on the
        device's stream."""
        job = step.prefetched
        flag = self._flag
        if (
            flag is not None
            and job is not None
            and job.complete
            and job.request_ids == step.request_ids
            and (not job.dropped or job.dropped.isdisjoint(step.request_ids))
        ):
            flag.wait_on_device(job.ticket)
            self._handed_to_device.append(job)
            self.steps_handed_to_device += 1
            self._check_finished()
            return GrammarMasks(step.batch_rows, job.bitmask, written_later=not flag.waits_on_host)
        self.settle()  # before any matcher
        ahead = job.future.result() if job is not None else None
        if job is not None and ahead is not None:
            job.complete = ahead.complete
            if job.dropped and not job.dropped.isdisjoint(step.request_ids):
                ahead = _without(ahead, job.dropped)
        if not step.request_ids:
            return None
        if step.started is not None:
            return step.started.result()
        rows = step.rows
        missing = [(row, rid) for row, rid in rows if ahead is None or rid not in ahead.index]
        computed = None
        if missing:
            if not self.sequences.tokens_known([rid for _, rid in missing]):
                wait_for_tokens()  # grammars need real token ids, not placeholders
            computed = self.sequences.start_masks(missing).result()
        return merge_masks(rows, ahead, computed, self._buffer(len(rows)))

    def prefetch(self, step: StartedMasks, pending: PendingStepOutput) -> None:
        """After the step's sampling is queued: the next step's masks, computed once its tokens land."""
        constrained = sampled_rows(step.batch_rows, step.request_ids, pending.positions)
        request_ids = step.request_ids
        buffer = self._buffer(len(request_ids))
        positions = tuple(constrained.positions)
        before = step.prefetched
        complete = (
            before is not None
            and before.complete
            and before.request_ids == request_ids
            and all(map(operator.eq, positions, map(operator.add, before.positions, itertools.repeat(1))))
            and self.sequences.holds_all(request_ids)
        )
        ticket, written = 0, None
        if self._flag is not None:
            self._last_ticket = ticket = self._last_ticket + 1
            written = functools.partial(self._flag.release, ticket)
        future = self.sequences.prefetch_masks(constrained, pending.peek_token_ids, buffer, written)
        bitmask = buffer[: len(request_ids)]
        self._prefetched = PrefetchJob(future, request_ids, positions, bitmask, ticket, complete)

    def drop(self, request_ids: frozenset[str]) -> None:
        """Sequences that ended: the prefetch made after their last step (kept until the next step
        that samples) must not hand their masks to new requests that reuse their ids."""
        job = self._prefetched
        if job is not None and request_ids and not request_ids.isdisjoint(job.request_ids):
            job.dropped = job.dropped | request_ids

    def settle(self) -> None:
        """Wait for every job handed to the device, raising the first failure."""
        handed, self._handed_to_device = self._handed_to_device, []
        for job in handed:
            _check_complete(job)

    def _check_finished(self) -> None:
        """Raise the failure of any job handed to the device that has finished, without waiting."""
        while self._handed_to_device and self._handed_to_device[0].future.done():
            _check_complete(self._handed_to_device.pop(0))


def _without(ahead: PrefetchedMasks, dropped: frozenset[str]) -> PrefetchedMasks:
    """The prefetched masks less the dropped sequences' rows (compacted: merge_masks reads row i as
    the i-th request's when the ids come in order)."""
    kept = [(rid, row) for rid, row in ahead.index.items() if rid not in dropped]
    rows = [row for _, row in kept]
    return PrefetchedMasks({rid: i for i, (rid, _) in enumerate(kept)}, ahead.bitmask[rows])


def _check_complete(job: PrefetchJob) -> None:
    """A job whose masks the device used: it must have finished well and advanced every sequence."""
    masks = job.future.result()  # the job's own failure, if it failed
    if not masks.complete:
        raise RuntimeError("the device used grammar masks of a prefetch that did not advance every sequence")
