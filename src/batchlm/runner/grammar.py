"""The runner's side of structured outputs: its constrained sequences, and which rows of a sampled
batch they are."""

from __future__ import annotations

from pathlib import Path

from batchlm.config import EngineConfig
from batchlm.structured.factory import backend_factory
from batchlm.structured.sequences import ConstrainedSequences


def constrained_sequences(config: EngineConfig, model_dir: Path, vocab_size: int) -> ConstrainedSequences:
    return ConstrainedSequences(backend_factory(config, model_dir, vocab_size))


def constrained_rows(sequences: ConstrainedSequences, request_ids: tuple[str, ...]) -> list[tuple[int, str]]:
    """(batch row, request id) of the constrained sequences among a step's sampled rows."""
    if not len(sequences):
        return []
    return [(row, request_id) for row, request_id in enumerate(request_ids) if request_id in sequences]
