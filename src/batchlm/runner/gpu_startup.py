"""The passes a GPU runner makes before it serves: compile its Triton kernels together, measure the
peak memory of the largest step the scheduler can send (the KV cache gets what is left), and warm up
what those passes do not reach."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from batchlm.attention.backend import AttentionBackend
from batchlm.config import EngineConfig
from batchlm.core.step_io import ScheduledChunk, SchedulerOutput
from batchlm.kernels.parallel_compile import compile_deferred, compile_threads, defer_compiles
from batchlm.layers.moe import warm_up_experts
from batchlm.layers.quantization.decode_tuning import tune_decode_linears
from batchlm.models.base import CausalLM
from batchlm.models.loader import ModelShape
from batchlm.runner.cuda_graph import DecodeGraphs
from batchlm.runner.inputs import build_step_inputs
from batchlm.runner.kv_cache import allocate_kv_caches, start_peak_measurement
from batchlm.sampling.grammar_mask import warm_up_grammar_masks
from batchlm.sampling.sampler import Sampler
from batchlm.sampling.state import SamplingState
from batchlm.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from batchlm.startup_log import log_phase

logger = logging.getLogger(__name__)

# What the profile run's sampled rows ask for: the sampler's widest path (a float32 copy, log-softmax
# for logprobs, the penalties' token counts and the full sort of top-p), so its scratch memory is
# measured at its largest.
PROFILE_SAMPLING = SamplingParams(
    temperature=1.0,
    top_p=0.5,
    logprobs=MAX_TOP_LOGPROBS,
    repetition_penalty=1.1,
    presence_penalty=0.5,
    frequency_penalty=0.5,
)


@dataclass(frozen=True)
class LargestStep:
    """The most the scheduler can put in one step: `tokens` computed (its token budget, unless
    max_num_seqs requests of a full context hold fewer) and `sampled_rows` rows whose logits it
    samples (a row per request, or per verified token of a verify step)."""

    tokens: int
    sampled_rows: int

    @staticmethod
    def of(budget: int, max_num_seqs: int, max_model_len: int, most_verify_rows: int = 0) -> LargestStep:
        tokens = min(budget, max_num_seqs * max_model_len)
        return LargestStep(tokens, min(tokens, max(max_num_seqs, most_verify_rows)))


def hidden_states_bytes(step: LargestStep, hidden_size: int, element_size: int) -> int:
    """The least a forward over the step holds at once: its hidden states and their residual. A step
    past the device's memory by this alone is refused before its inputs are even built (a budget in
    the hundreds of millions of tokens would otherwise spend minutes on the host first)."""
    return 2 * step.tokens * hidden_size * element_size


def largest_step_oom_message(step: LargestStep, block_size: int) -> str:
    """What start-up says when the profile run itself runs out of GPU memory: such a step would
    fail while serving too, so the flags that size it are named (and --block-size where the run's
    scratch cache of whole blocks may be what took the memory)."""
    return (
        f"the largest step the scheduler can send ({step.tokens} tokens, {step.sampled_rows} of them "
        "sampled) does not fit in GPU memory beside the model: lower --max-num-batched-tokens (or "
        "--max-num-seqs"
        + ("" if block_size <= EngineConfig.block_size else f", or --block-size {block_size}")
        + ")"
    )


def warm_up_oom_message(config: EngineConfig, single_rank: bool) -> str:
    """What start-up says when the warm-up or the graph captures run out of the memory the KV cache
    left: the flags that leave them more."""
    return (
        "the kernel warm-up and CUDA graphs ran out of the GPU memory the KV cache left: lower "
        "--gpu-memory-utilization"
        + ("" if config.num_gpu_blocks_override is None else " or --num-gpu-blocks-override")
        + (", or pass --enforce-eager" if not config.enforce_eager and single_rank else "")
    )


def profile_step(tokens: int, max_model_len: int, block_size: int) -> tuple[SchedulerOutput, int]:
    """A step of `tokens` prompt tokens as whole prompts of at most max_model_len tokens (a budget
    above the context is filled by several requests' prompts at once; one prompt longer than the
    context would not be scheduled, and its positions could pass the model's rotary tables). Returns
    the step and the blocks it writes: the prompts share them, so the throwaway cache, which counts in
    the measured peak, is no larger than one prompt's (their keys and values overwrite each other,
    which only the memory measurement sees). A one-token remainder goes first: the attention metadata
    takes the leading one-token chunks for decodes."""
    full, rest = divmod(tokens, max_model_len)
    lengths = ([rest] if rest else []) + [max_model_len] * full
    blocks = -(-max(lengths) // block_size)
    chunks = tuple(
        ScheduledChunk(f"profile-{index}", (0,) * length, 0, tuple(range(-(-length // block_size))), True)
        for index, length in enumerate(lengths)
    )
    return SchedulerOutput(chunks, (), frozenset()), blocks


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
    # What the profile run computes and samples: the largest step the scheduler can send.
    largest_step: LargestStep
    max_model_len: int
    max_blocks_per_seq: int

    def measure_peak(self) -> None:
        """Compile the kernels, then run the largest step with the peak-memory counter reset (the KV
        cache gets what is left). A step that cannot fit is refused naming the flags that size it."""
        refusal = largest_step_oom_message(self.largest_step, self.block_size)
        total = torch.cuda.get_device_properties(self.device).total_memory
        if hidden_states_bytes(self.largest_step, self.shape.hidden_size, self.dtype.itemsize) > total:
            raise ValueError(refusal)
        try:
            self.compile_kernels_concurrently()
            start_peak_measurement(self.device)
            self.profile_run()
        except torch.cuda.OutOfMemoryError as error:
            raise ValueError(refusal) from error

    def warm_up_and_capture(
        self, kv_caches: list[torch.Tensor], graph_batch: int | None, oom_message: str
    ) -> DecodeGraphs | None:
        """Warm up the kernels the profile run did not reach, then capture the decode graphs of up to
        `graph_batch` rows (None: no graphs). Running out of memory here is refused with
        `oom_message`."""
        try:
            self.warm_up_kernels(kv_caches[0])
            if graph_batch is None:
                return None
            graphs = DecodeGraphs(
                self.model,
                kv_caches,
                self.attn,
                max_batch=graph_batch,
                max_blocks_per_seq=self.max_blocks_per_seq,
                device=self.device,
            )
            graphs.capture()
        except torch.cuda.OutOfMemoryError as error:
            raise ValueError(oom_message) from error
        return graphs

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
        """The largest step (a full token budget, then its most sampled rows through the sampler)
        with a throwaway cache of its own, to measure peak memory: a smaller one would leave the KV
        cache memory that such a step needs while serving."""
        step, blocks = profile_step(self.largest_step.tokens, self.max_model_len, self.block_size)
        scratch = allocate_kv_caches(self.shape, blocks, self.block_size, self.kv_dtype, self.device)
        inputs = build_step_inputs(step, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, scratch, inputs.meta, self.attn)
        rows = self.largest_step.sampled_rows
        logits = self.model.compute_logits(hidden[torch.arange(rows, device=self.device)])
        del scratch, hidden
        states = [SamplingState.create(PROFILE_SAMPLING, None, [0], [], (), self.device) for _ in range(rows)]
        # Twice: the penalties' counts of one step live until the next step's replace them.
        for _ in range(2):
            self.sampler.sample_on_device(logits, states, logits_are_scratch=True)
        self.sampler.forget_batch()
        if self.device.type == "cuda":  # (the CPU runs it only in tests)
            torch.cuda.synchronize(self.device)
        del logits

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
