"""The engine's grammar backend for a model, built on the first constrained request (an engine that
never sees one pays nothing at start-up): llguidance over the model's Hugging Face tokenizer."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from batchlm.config import EngineConfig
from batchlm.structured.backend import GrammarBackend
from batchlm.structured.mask_process import ProcessBackend
from batchlm.structured.process_messages import BackendSpec
from batchlm.structured.shared_words import SharedWords

logger = logging.getLogger(__name__)

BackendFactory = Callable[[tuple[int, ...]], GrammarBackend]
# BATCHLM_GRAMMAR_PROCESS=1 runs the matchers in a process of their own (structured.mask_process).
OWN_PROCESS_ENV = "BATCHLM_GRAMMAR_PROCESS"


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
    config: EngineConfig,
    model_dir: Path,
    vocab_size: int,
    on_accelerator: bool = False,
    own_process: bool | None = None,
    words: SharedWords | None = None,
) -> BackendFactory:
    """A function of the engine's EOS ids making the backend; vocab_size is the model's logits width;
    on_accelerator: the model runs on a GPU (more cores are free for the masks); own_process: the
    matchers in a child process (None: as OWN_PROCESS_ENV says); words: the counters it shares with
    the engine, for tokens it waits for itself (ProcessBackend.landing)."""
    if own_process is None:
        own_process = in_own_process()

    def make(eos_token_ids: tuple[int, ...]) -> GrammarBackend:
        log_level = logging.getLogger("batchlm").getEffectiveLevel()
        spec = BackendSpec(config, model_dir, vocab_size, on_accelerator, eos_token_ids, log_level)
        if own_process:
            return ProcessBackend(spec, local_backend, words)
        return local_backend(spec)

    return make


def in_own_process() -> bool:
    """Whether the engine's grammar backend runs in a process of its own (OWN_PROCESS_ENV; Linux only)."""
    if os.environ.get(OWN_PROCESS_ENV) != "1":
        return False
    if not sys.platform.startswith("linux"):
        logger.warning("%s=1 is for Linux; the grammar backend runs in the engine's process", OWN_PROCESS_ENV)
        return False
    return True


def local_backend(spec: BackendSpec) -> GrammarBackend:
    """llguidance over the model's Hugging Face tokenizer, in this process."""
    from batchlm.structured.llguidance_backend import LLGuidanceBackend
    from batchlm.tokenizer.hf_loading import load_hf_tokenizer

    started = time.perf_counter()
    config = spec.config
    hf = load_hf_tokenizer(tokenizer_dir(config, spec.model_dir), config.trust_remote_code)
    threads = mask_threads(spec.on_accelerator)
    backend = LLGuidanceBackend.from_hf(
        hf, spec.vocab_size, spec.eos_token_ids, threads, batched_accept=spec.on_accelerator
    )
    logger.info("structured outputs: grammar backend ready in %.2f s", time.perf_counter() - started)
    return backend
