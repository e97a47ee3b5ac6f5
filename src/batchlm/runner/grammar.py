"""The runner's side of structured outputs: the engine's grammar backend, built on the first
constrained request from the model's tokenizer, and the constrained rows of each sampled batch."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from batchlm.config import EngineConfig
from batchlm.structured.backend import GrammarBackend
from batchlm.structured.sequences import ConstrainedSequences

logger = logging.getLogger(__name__)


def tokenizer_dir(config: EngineConfig, model_dir: Path) -> Path:
    if not config.tokenizer:
        return model_dir
    from batchlm.models.hub import resolve_model_dir

    return resolve_model_dir(config.tokenizer, config.revision)


def mask_threads() -> int:
    """llguidance's threads for one step's masks: the cores the forward pass leaves, at least one."""
    return max(1, min(8, (os.cpu_count() or 2) // 4))


def backend_factory(
    config: EngineConfig, model_dir: Path, vocab_size: int
) -> Callable[[tuple[int, ...]], GrammarBackend]:
    """A function making the llguidance backend for the model's tokenizer (loaded when first needed:
    an engine that never sees a constrained request pays nothing at start-up)."""

    def make(eos_token_ids: tuple[int, ...]) -> GrammarBackend:
        from batchlm.structured.llguidance_backend import LLGuidanceBackend
        from batchlm.tokenizer.hf_loading import load_hf_tokenizer

        started = time.perf_counter()
        hf = load_hf_tokenizer(tokenizer_dir(config, model_dir), config.trust_remote_code)
        backend = LLGuidanceBackend.from_hf(hf, vocab_size, eos_token_ids, threads=mask_threads())
        logger.info("structured outputs: grammar backend ready in %.2f s", time.perf_counter() - started)
        return backend

    return make


def constrained_sequences(config: EngineConfig, model_dir: Path, vocab_size: int) -> ConstrainedSequences:
    return ConstrainedSequences(backend_factory(config, model_dir, vocab_size))


def constrained_rows(sequences: ConstrainedSequences, request_ids: tuple[str, ...]) -> list[tuple[int, str]]:
    """(batch row, request id) of the constrained sequences among a step's sampled rows."""
    if not len(sequences):
        return []
    return [(row, request_id) for row, request_id in enumerate(request_ids) if request_id in sequences]
