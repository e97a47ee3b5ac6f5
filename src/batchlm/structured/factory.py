"""The engine's grammar backend for a model, built on the first constrained request (an engine that
never sees one pays nothing at start-up): llguidance over the model's Hugging Face tokenizer."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchlm.config import EngineConfig
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarBackend

logger = logging.getLogger(__name__)

BackendFactory = Callable[[tuple[int, ...]], GrammarBackend]


def tokenizer_dir(config: EngineConfig, model_dir: Path) -> Path:
    if not config.tokenizer:
        return model_dir
    from batchlm.models.hub import resolve_model_dir

    return resolve_model_dir(config.tokenizer, config.revision)


def mask_threads(on_accelerator: bool = False) -> int:
    """llguidance's threads for one step's masks. Beside an accelerator the cores idle while it runs the
    model: all but four (the engine thread, the mask worker, the front end and the device's own host
    threads keep theirs), at most 16. On a CPU engine the model needs them: half, at most 8."""
    cores = os.cpu_count() or 2
    if on_accelerator:
        return max(1, min(16, cores - 4))
    return max(1, min(8, cores // 2))


def backend_factory(
    config: EngineConfig, model_dir: Path, vocab_size: int, on_accelerator: bool = False
) -> BackendFactory:
    """A function of the engine's EOS ids making the backend; vocab_size is the model's logits width;
    on_accelerator: the model runs on a GPU (more cores are free for the masks)."""

    def make(eos_token_ids: tuple[int, ...]) -> GrammarBackend:
        from batchlm.structured.llguidance_backend import LLGuidanceBackend
        from batchlm.tokenizer.hf_loading import load_hf_tokenizer

        started = time.perf_counter()
        hf = load_hf_tokenizer(tokenizer_dir(config, model_dir), config.trust_remote_code)
        threads = mask_threads(on_accelerator)
        backend = LLGuidanceBackend.from_hf(
            hf, vocab_size, eos_token_ids, threads, batched_accept=on_accelerator
        )
        logger.info("structured outputs: grammar backend ready in %.2f s", time.perf_counter() - started)
        return backend

    return make


def tokenizer_grammar_check(hf: Any, vocab_size: int) -> Callable[[StructuredOutputs], None]:
    """The API edge's check of the tokens a user's grammar names (token_check.GrammarTokenCheck),
    importing llguidance on the first grammar, not at start-up."""
    check: Callable[[StructuredOutputs], None] | None = None

    def run(spec: StructuredOutputs) -> None:
        nonlocal check
        if spec.grammar is None:
            return
        if check is None:
            from batchlm.structured.token_check import GrammarTokenCheck

            check = GrammarTokenCheck(hf, vocab_size)
        check(spec)

    return run
