"""What a step's grammar masks travel in: from the constrained sequences to the sampler (GrammarMasks),
computed ahead of a step (PrefetchedMasks), and the constrained rows of a launched step (SampledRows)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GrammarMasks:
    """One step's masks for the constrained rows of the sampled batch."""

    # Batch rows (in sampling order) that are constrained, ascending.
    rows: tuple[int, ...]
    # [len(rows), words] int32: bit t % 32 of word t // 32 set when token t is allowed.
    bitmask: np.ndarray
    # The mask worker writes bitmask later, and the device's stream waits for it: only a copy queued
    # on the stream (from the pinned buffer itself) may read it.
    written_later: bool = False


@dataclass(frozen=True)
class PrefetchedMasks:
    """Masks computed ahead of a step, as soon as the tokens they follow were sampled."""

    # Request id -> its row in bitmask (sequences that could not be advanced are absent).
    index: dict[str, int]
    # [len(index), words] int32, the same layout as GrammarMasks.bitmask.
    bitmask: np.ndarray
    # Every sequence was advanced through its sampled token, so mask row i is sequence i's.
    complete: bool = False


@dataclass(frozen=True)
class SampledRows:
    """The constrained rows of a launched step, as parallel lists (one object a step, not one a row:
    the engine thread makes it)."""

    request_ids: list[str]
    # Each token's row among the step's sampled tokens.
    rows: list[int]
    # Where each token will sit in its sequence's output_token_ids.
    positions: list[int]

    def only(self, kept: list[int]) -> SampledRows:
        return SampledRows(
            [self.request_ids[i] for i in kept],
            [self.rows[i] for i in kept],
            [self.positions[i] for i in kept],
        )
