"""The passes a GPU runner makes before it serves: compile its Triton kernels together, measure the
peak memory of a full token budget (the KV cache gets what is left), and warm up what those passes do
not reach."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from batchlm.attention.backend import AttentionBackend
from batchlm.core.step_io import ScheduledChunk, SchedulerOutput
from batchlm.kernels.parallel_compile import compile_deferred, compile_threads, defer_compiles
from batchlm.layers.moe import warm_up_experts
from batchlm.layers.quantization.decode_tuning import tune_decode_linears
from batchlm.models.base import CausalLM
from batchlm.models.loader import ModelShape
from batchlm.runner.inputs import build_step_inputs
from batchlm.runner.kv_cache import allocate_kv_caches
from batchlm.sampling.grammar_mask import warm_up_grammar_masks
from batchlm.sampling.sampler import Sampler
from batchlm.startup_log import log_phase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuStartup:
    """What the passes run: the runner's model, attention backend and sampler, and its sizes."""

    model: CausalLM
    attn: AttentionBackend
    sampler: Sampler
    shape: ModelShape
    dtype: torch.dtype
    kv_dtype: torch.dtype
    device: torch.device
    block_size: int
    # The profile run's tokens: a full step budget, at most the context length.
    profile_tokens: int
    max_blocks_per_seq: int

    @torch.inference_mode()
    def compile_kernels_concurrently(self) -> None:
        """Compile what the profile run and the warm-up will launch, on several threads (a cold
        start otherwise spends seconds compiling one kernel after another): a dry run of both notes
        each variant, then they compile together. Only the compile time changes; the real runs
        that follow launch the same kernels, now compiled."""
        started = time.perf_counter()
        threads = compile_threads()
        with defer_compiles() as deferred:
            if deferred is None:
                return
            self.profile_run()
            scratch = allocate_kv_caches(self.shape, 1, self.block_size, self.kv_dtype, self.device)
            self.warm_up_kernels(scratch[0])
            del scratch
        compile_deferred(deferred, threads)
        log_phase(
            logger,
            "Triton kernels compiled",
            time.perf_counter() - started,
            f"{len(deferred)} kernel variants on {threads} threads, loaded from Triton's disk cache where it has them",
        )

    @torch.inference_mode()
    def profile_run(self) -> None:
        """A forward over a full token budget with a throwaway one-block cache, to measure peak memory."""
        tokens = self.profile_tokens
        blocks = -(-tokens // self.block_size)
        chunk = ScheduledChunk("profile", tuple([0] * tokens), 0, tuple(range(blocks)), True)
        scratch = allocate_kv_caches(self.shape, blocks, self.block_size, self.kv_dtype, self.device)
        inputs = build_step_inputs(SchedulerOutput((chunk,), (), frozenset()), self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, scratch, inputs.meta, self.attn)
        self.model.compute_logits(hidden[inputs.sample_indices])
        torch.cuda.synchronize(self.device)
        del scratch, hidden

    @torch.inference_mode()
    def warm_up_kernels(self, kv_cache: torch.Tensor) -> None:
        """Compile the Triton kernel variants that the profile run and the graph captures may not
        reach (attention tiles and splits picked per step, the sampling race), so no step waits
        for a JIT compile while serving; time the quantized linears' decode launches. kv_cache: one
        layer's cache (only its layout matters)."""
        specs = [layer.attention for layer in self.model.config.layers]
        self.attn.warm_up(
            kv_cache, self.shape.num_heads, self.max_blocks_per_seq, specs, query_dtype=self.dtype
        )
        hidden = torch.zeros((1, self.shape.hidden_size), dtype=self.dtype, device=self.device)
        logits = self.model.compute_logits(hidden)
        self.sampler.warm_up(logits)
        warm_up_grammar_masks(logits[:, : self.shape.vocab_size])
        warm_up_experts(self.model)
        tune_decode_linears(self.model, self.dtype)
        torch.cuda.synchronize(self.device)
