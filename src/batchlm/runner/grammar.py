"""The runner's side of structured outputs: its constrained sequences, and which rows of a sampled
batch they are."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from batchlm.config import EngineConfig
from batchlm.structured.factory import backend_factory
from batchlm.structured.sequences import ConstrainedSequences, GrammarMasks, PrefetchedMasks, SampledSlot


def constrained_sequences(config: EngineConfig, model_dir: Path, vocab_size: int) -> ConstrainedSequences:
    return ConstrainedSequences(backend_factory(config, model_dir, vocab_size))


def constrained_rows(sequences: ConstrainedSequences, request_ids: tuple[str, ...]) -> list[tuple[int, str]]:
    """(batch row, request id) of the constrained sequences among a step's sampled rows."""
    if not len(sequences):
        return []
    return [(row, request_id) for row, request_id in enumerate(request_ids) if request_id in sequences]


def sampled_slots(rows: Sequence[tuple[int, str]], positions: Sequence[int]) -> list[SampledSlot]:
    """The constrained rows of a launched step, with where each row's token lands in its sequence."""
    return [SampledSlot(request_id, row, positions[row]) for row, request_id in rows]


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
