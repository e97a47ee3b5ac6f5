"""The engine's grammar backend for a model, built on the first constrained request (an engine that
never sees one pays nothing at start-up): llguidance over the model's Hugging Face tokenizer."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from batchlm.config import EngineConfig
from batchlm.structured.backend import GrammarBackend

logger = logging.getLogger(__name__)

BackendFactory = Callable[[tuple[int, ...]], GrammarBackend]


def tokenizer_dir(config: EngineConfig, model_dir: Path) -> Path:
    if not config.tokenizer:
        return model_dir
    from batchlm.models.hub import resolve_model_dir

    return resolve_model_dir(config.tokenizer, config.revision)


def mask_threads() -> int:
    """llguidance's threads for one step's masks: half the cores, at most 8 (a GPU host has them idle;
    on a small CPU box the model needs the rest)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def backend_factory(config: EngineConfig, model_dir: Path, vocab_size: int) -> BackendFactory:
    """A function of the engine's EOS ids making the backend; vocab_size is the model's logits width."""

    def make(eos_token_ids: tuple[int, ...]) -> GrammarBackend:
        from batchlm.structured.llguidance_backend import LLGuidanceBackend
        from batchlm.tokenizer.hf_loading import load_hf_tokenizer

        started = time.perf_counter()
        hf = load_hf_tokenizer(tokenizer_dir(config, model_dir), config.trust_remote_code)
        backend = LLGuidanceBackend.from_hf(hf, vocab_size, eos_token_ids, threads=mask_threads())
        logger.info("structured outputs: grammar backend ready in %.2f s", time.perf_counter() - started)
        return backend

    return make
