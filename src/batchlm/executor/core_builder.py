"""Assemble an engine core (model runner or tensor-parallel executor, and scheduler) from a config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from batchlm.config import EngineConfig
from batchlm.core.engine_core import EngineCore, Executor
from batchlm.core.facts import ModelFacts
from batchlm.core.grammar_wait import GrammarCompiles
from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.core.speculation import SPECULATIVE_MODES, SpeculationConfig
from batchlm.gc_tuning import freeze_startup_objects
from batchlm.startup_log import log_uptime, timed_phase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartupPhases:
    """The start-up phase names logged for the device in use (a CPU start has no CUDA context, profile
    run or graphs to speak of)."""

    imports: str
    runner: str
    sizing: str
    allocation: str

    @staticmethod
    def for_device(device: str) -> StartupPhases:
        from batchlm.runner.device import resolve_device

        if resolve_device(device).type == "cuda":
            return StartupPhases(
                "runner imports (model code, Triton)",
                "model runner (config, CUDA context, model, weights)",
                "profile run (peak activation memory)",
                "KV cache allocation and CUDA graphs",
            )
        return StartupPhases(
            "runner imports (model code)",
            "model runner (config, model, weights, CPU kernels)",
            "KV cache sizing",
            "KV cache allocation",
        )


ASYNC_SCHEDULING_MODES = ("auto", "on", "off")


def check_async_scheduling(config: EngineConfig) -> None:
    """Refuse an unknown --async-scheduling value, or "on" where it cannot work, before loading anything."""
    mode = config.async_scheduling
    if mode not in ASYNC_SCHEDULING_MODES:
        choices = ", ".join(ASYNC_SCHEDULING_MODES)
        raise ValueError(f"--async-scheduling must be one of {choices}, got {mode!r}")
    if mode == "on" and config.tensor_parallel_size > 1:
        raise ValueError(
            "--async-scheduling on is not supported with --tensor-parallel-size > 1 (the workers run steps "
            "in lockstep); use auto or off"
        )


def resolve_async_scheduling(config: EngineConfig, device: str) -> bool:
    """ "auto" turns async scheduling on for a single CUDA device: on CPU the host is the device, so
    there is nothing to overlap, and tensor-parallel workers run their steps synchronously."""
    check_async_scheduling(config)
    if config.async_scheduling == "auto":
        return config.tensor_parallel_size == 1 and device.startswith("cuda")
    return config.async_scheduling == "on"


# "auto" speculates while at most this many requests run on a CUDA device: verify steps replay the
# decode CUDA graphs (runner/decode_rows.py), so at one request they cost little more than a decode, while
# at 16 the extra rows cost more than the accepted drafts save (BENCHMARKS.md, speculative_gpu.py runs).
CUDA_SPECULATIVE_MAX_BATCH = 4
# The same limit per device kind. CPU: measured with the default model (BENCHMARKS.md).
SPECULATIVE_MAX_BATCH = {"cpu": 4, "cuda": CUDA_SPECULATIVE_MAX_BATCH}
# Draft tokens per verify step. CPU: 7, so a verify chunk is 8 rows, two whole passes of the quantized
# matmul kernels' 4-row blocks (measured against 3 and 4 in BENCHMARKS.md).
SPECULATIVE_TOKENS = {"cpu": 7, "cuda": 4}
# Tokens of finished requests kept to draft from (core/ngram_pool.py). CPU: measured with the default
# model (BENCHMARKS.md); CUDA: off, not measured there (a proposal that misses scans the whole pool).
SPECULATIVE_POOL_TOKENS = {"cpu": 65536, "cuda": 0}


def check_speculation(config: EngineConfig) -> None:
    """Refuse speculation settings that are out of range, before the model loads."""
    if config.speculative not in SPECULATIVE_MODES:
        raise ValueError(
            f"--speculative must be one of {', '.join(SPECULATIVE_MODES)}, got {config.speculative!r}"
        )
    if config.num_speculative_tokens is not None and config.num_speculative_tokens < 1:
        raise ValueError(f"--num-speculative-tokens must be positive, got {config.num_speculative_tokens}")
    if config.speculative_max_batch is not None and config.speculative_max_batch < 0:
        raise ValueError(f"--speculative-max-batch must not be negative, got {config.speculative_max_batch}")
    if config.speculative_pool_tokens is not None and config.speculative_pool_tokens < 0:
        raise ValueError(
            f"--speculative-pool-tokens must not be negative, got {config.speculative_pool_tokens}"
        )


def resolve_speculation(config: EngineConfig, device: str) -> SpeculationConfig:
    """The scheduler's speculation settings. Off under tensor parallelism (the workers' wire format
    carries no draft tokens)."""
    check_speculation(config)
    conflict = config.speculation_conflict()
    if conflict is not None:
        # The CLIs refuse it among their flags; LLM(...) callers comparing modes with one set of
        # values (benchmarks/speculative_*.py) are told the value does nothing here.
        logger.warning("%s: ignored", conflict)
    mode = config.speculative if config.tensor_parallel_size == 1 else "off"
    asked = speculation_asked_for(config)
    if asked and mode == "off" and config.speculative != "off":
        # Asked for by name, so say it is not done (as the MLX backend does for what it ignores); "auto"
        # alone makes no promise to break.
        logger.warning(
            "%s %s ignored with --tensor-parallel-size %d: tensor-parallel workers do not verify draft tokens",
            ", ".join(asked),
            "is" if len(asked) == 1 else "are",
            config.tensor_parallel_size,
        )
    kind = "cuda" if device.startswith("cuda") else "cpu"
    max_batch = (
        config.speculative_max_batch
        if config.speculative_max_batch is not None
        else SPECULATIVE_MAX_BATCH[kind]
    )
    num_tokens = config.num_speculative_tokens or SPECULATIVE_TOKENS[kind]
    pool_tokens = config.speculative_pool_tokens
    if pool_tokens is None:
        pool_tokens = SPECULATIVE_POOL_TOKENS[kind]
    return SpeculationConfig(mode=mode, num_tokens=num_tokens, max_batch=max_batch, pool_tokens=pool_tokens)


def speculation_asked_for(config: EngineConfig) -> list[str]:
    """The speculation the config asks for by name ("--speculative ngram", "--num-speculative-tokens 3"):
    the default "auto", tuning values left unset and the zeros that turn a part off ask for none."""
    asked = ["--speculative ngram"] if config.speculative == "ngram" else []
    tuning = {
        "--num-speculative-tokens": config.num_speculative_tokens,
        "--speculative-max-batch": config.speculative_max_batch,
        "--speculative-pool-tokens": config.speculative_pool_tokens,
    }
    return asked + [f"{flag} {value}" for flag, value in tuning.items() if value]


def build_scheduler(config: EngineConfig, info: ModelFacts, prefix_cache_salt: str = "") -> Scheduler:
    """The scheduler for a started runner: the user's limits plus what the runner sized."""
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=info.max_num_batched_tokens,
            max_model_len=info.max_model_len,
            block_size=info.block_size,
            num_blocks=info.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            prefix_cache_salt=prefix_cache_salt,
            speculation=resolve_speculation(config, info.device),
            long_rope_after=info.long_rope_after,
        )
    )


def build_engine_core(config: EngineConfig, model_dir: Path) -> tuple[EngineCore, ModelFacts]:
    """Load the model, size the KV cache, and wire the scheduler to the runner (or TP workers)."""
    check_async_scheduling(config)
    check_speculation(config)
    executor: Executor
    # Grammars compiled before their requests are scheduled (under tensor parallelism, on every rank).
    grammars: GrammarCompiles
    if config.tensor_parallel_size > 1:
        from batchlm.executor.tensor_parallel import build_tensor_parallel_executor

        executor, info = build_tensor_parallel_executor(config, model_dir)
        grammars = executor.grammars()
    else:
        # Python's start and the imports so far (torch included) happen before this point.
        log_uptime(logger, "engine core: interpreter up, torch imported")
        phases = StartupPhases.for_device(config.device)
        with timed_phase(logger, phases.imports):
            from batchlm.runner.model_runner import ModelRunner
        with timed_phase(logger, phases.runner):
            runner = ModelRunner(config, model_dir)
        speculation = resolve_speculation(config, str(runner.device))
        runner.most_verify_rows = speculation.most_verify_rows(config.max_num_seqs)
        runner.attn.newest_decode_tokens = speculation.most_new_tokens()
        # initialize_kv_cache in its two steps, each timed.
        with timed_phase(logger, phases.sizing):
            num_blocks = runner.determine_num_blocks()
        with timed_phase(logger, phases.allocation):
            info = runner.allocate_kv_cache(num_blocks)
        executor = runner
        grammars = runner.grammars.compiles
    scheduler = build_scheduler(config, info, prefix_cache_salt=f"{model_dir}|{config.adapter_path or ''}")
    log_uptime(logger, "engine core: ready")
    async_scheduling = resolve_async_scheduling(config, info.device)
    logger.info("async scheduling: %s", "on" if async_scheduling else "off")
    if info.device.startswith("cuda"):
        freeze_startup_objects()
        from batchlm.kernels.compile_watch import watch_compiles_after_startup

        watch_compiles_after_startup()
    return EngineCore(scheduler, executor, async_scheduling=async_scheduling, grammars=grammars), info
