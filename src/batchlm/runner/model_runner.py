"""The model runner: owns the model, the KV cache and the sampler; executes one scheduled step."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from batchlm.attention.choice import choose_attention_backend
from batchlm.config import EngineConfig
from batchlm.core.facts import ModelFacts
from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
from batchlm.layers.embedding import use_cpu_lm_head
from batchlm.layers.linear import pack_linears_for_cpu
from batchlm.layers.quantization.layer import has_quantized_layers
from batchlm.layers.rotary import long_rope_switch
from batchlm.models.loader import LoadedModel, ModelShape, load_model
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup
from batchlm.runner.cpu_kernel_builds import build_cpu_kernels
from batchlm.runner.cpu_threads import cap_cpu_threads
from batchlm.runner.cuda_graph import DecodeGraphs, graph_batch_limit
from batchlm.runner.deferred_step import DeferredStepOutput, LaunchedForward
from batchlm.runner.device import dtype_name, resolve_device, resolve_dtype
from batchlm.runner.draft_verify import Verification, row_states, verify_groups
from batchlm.runner.fused_decode import MAX_VERIFY_ROWS, FusedDecode, build_fused_decode
from batchlm.runner.gpu_startup import GpuStartup, LargestStep, warm_up_oom_message
from batchlm.runner.grammar import MaskBuffers, StepMasks, constrained_sequences
from batchlm.runner.heap import trim_heap
from batchlm.runner.host_flag import stream_flag
from batchlm.runner.inputs import StepInputBuilder, StepInputs
from batchlm.runner.kv_cache import (
    allocate_kv_caches,
    bytes_per_block,
    kv_cache_oom_message,
    layer_kv_scales,
    log_kv_cache,
    num_blocks_for,
    resolve_kv_cache_dtype,
)
from batchlm.runner.prompt_logprobs import PromptLogprobs
from batchlm.runner.step_output import PendingStepOutput, PreviousTokens
from batchlm.sampling.plan import has_penalty
from batchlm.sampling.sampler import Sampler
from batchlm.sampling.state import SamplingState

logger = logging.getLogger(__name__)


def default_max_num_batched_tokens(device: torch.device) -> int:
    # CPU: a chunk of ~512 tokens keeps one step near a second on a laptop, so decodes are not starved.
    return 8192 if device.type == "cuda" else 512


class ModelRunner:
    """Loads the model and runs SchedulerOutputs. The only engine piece that touches device tensors.

    Under tensor parallelism each rank builds one with its `tp` group and its own `device` (which
    overrides config.device, e.g. cuda:r for rank r); every rank then runs the same steps in lockstep.
    """

    def __init__(
        self,
        config: EngineConfig,
        model_dir: Path,
        tp: TensorParallelGroup | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config
        self.tp = tp or SINGLE_RANK
        self.device = resolve_device(str(device) if device is not None else config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            cap_cpu_threads()
            build_cpu_kernels()
        started = time.perf_counter()
        self.loaded: LoadedModel = load_model(
            model_dir,
            dtype=self.dtype,
            device=self.device,
            adapter_path=config.adapter_path,
            hf_overrides=config.hf_overrides or None,
            tp=self.tp,
            random_weights=config.load_format == "dummy",
            quantization=config.quantization,
            seed=config.seed,
            progress=self.tp.rank == 0,  # one progress bar, not one per rank
        )
        logger.info(
            "Loaded %s (%s, %s) in %.1f s",
            model_dir,
            dtype_name(self.dtype),
            self.device,
            time.perf_counter() - started,
        )
        self.model = self.loaded.model
        if self.device.type == "cpu":
            self._use_cpu_matmuls()
        self.shape: ModelShape = self.loaded.shape
        self.max_model_len = self._resolve_max_model_len()
        self.max_num_batched_tokens = config.max_num_batched_tokens or default_max_num_batched_tokens(
            self.device
        )
        self.attn = choose_attention_backend(self.device)
        self.kv_dtype = resolve_kv_cache_dtype(
            config.kv_cache_dtype, self.dtype, self.device, self.attn.name, has_quantized_layers(self.model)
        )
        self.sampler = Sampler(self.shape.vocab_size, self.device, seed=config.seed)
        self.states: dict[str, SamplingState] = {}
        self.input_builder = StepInputBuilder(config.block_size, self.device)
        self.input_builder.long_rope = long_rope_switch(self.model, self.max_model_len)
        # Requests with a repetition/presence/frequency penalty: their sampling needs real token ids.
        self._penalized_ids: set[str] = set()
        # Requests under a grammar (structured outputs): their matchers, by request id.
        self.grammars = constrained_sequences(
            config, model_dir, self.shape.vocab_size, on_accelerator=self.device.type != "cpu"
        )
        self.masks = StepMasks(
            self.grammars, MaskBuffers(self.sampler, self.grammars), stream_flag(self.device)
        )
        # The last step's sampled tokens (fill the next step's placeholders) and outputs not yet read.
        self._previous: PreviousTokens | None = None
        self._unresolved: list[PendingStepOutput] = []
        # The last launched step, while its sampling waits for its grammar masks.
        self._deferred: DeferredStepOutput | None = None
        # Requests gathering their prompt's logprobs until they sample their first token.
        self.prompt_logprobs = PromptLogprobs()
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.decode_graphs: DecodeGraphs | None = None
        self.fused_decode: FusedDecode | None = None
        # Rows of the largest verify step the scheduler may send (SpeculationConfig.most_verify_rows),
        # set by the engine before allocate_kv_cache: decode graphs are captured for them too.
        self.most_verify_rows = 0

    def _use_cpu_matmuls(self) -> None:
        """Move float32 weights to the CPU GEMM kernel's layout (kernels/cpu_gemm.py), once they are final."""
        started = time.perf_counter()
        packed = pack_linears_for_cpu(self.model)
        head = use_cpu_lm_head(self.model)
        if packed or head:
            logger.info(
                "CPU matmuls: %d linear layers packed for the AVX2 kernel, LM head %s (%.1f s)",
                packed,
                "packed" if head and packed else ("on oneDNN" if head else "on torch"),
                time.perf_counter() - started,
            )

    def _resolve_max_model_len(self) -> int:
        model_limit = self.shape.max_model_len
        asked = self.config.max_model_len
        if asked is None:
            return model_limit
        if asked > model_limit:
            raise ValueError(
                f"--max-model-len {asked} exceeds the model's context length {model_limit} (from its config)"
            )
        return asked

    def initialize_kv_cache(self) -> ModelFacts:
        """Profile peak activation memory (GPU), then size and allocate the KV cache from what is left."""
        return self.allocate_kv_cache(self.determine_num_blocks())

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit on this device (profiles a full-budget forward on GPU first).
        Tensor-parallel ranks all call this together: the profile forward runs collectives."""
        if self.device.type == "cuda":
            self._gpu_startup().measure_peak()
        return num_blocks_for(self.config, self.shape, self.kv_dtype, self.device, self.max_model_len)

    def allocate_kv_cache(self, num_blocks: int) -> ModelFacts:
        """Allocate `num_blocks` KV blocks (tensor parallel: the minimum over ranks) and capture graphs."""
        self.num_blocks = num_blocks
        try:
            self.kv_caches = allocate_kv_caches(
                self.shape, self.num_blocks, self.config.block_size, self.kv_dtype, self.device
            )
        except torch.cuda.OutOfMemoryError as error:
            per_block = bytes_per_block(self.shape, self.config.block_size, self.kv_dtype)
            raise ValueError(kv_cache_oom_message(self.config, num_blocks, per_block)) from error
        set_kv_scales = getattr(self.attn, "set_kv_scales", None)
        if set_kv_scales is not None:
            set_kv_scales(self.kv_caches, layer_kv_scales(self.loaded.kv_scales, self.shape.num_layers))
        log_kv_cache(self.num_blocks, self.config.block_size, self.kv_dtype, self.max_model_len)
        if self.device.type == "cpu":
            self.fused_decode = build_fused_decode(self.model, self.kv_caches, self.attn)
            if self.fused_decode is not None:  # verify steps take the fused stack too, as decode rows
                self.input_builder.max_decode_rows = MAX_VERIFY_ROWS
                self.fused_decode.share_row_ops()
            trim_heap()  # what loading freed would otherwise stay resident
        if self.device.type == "cuda":
            self.decode_graphs = self._gpu_startup().warm_up_and_capture(
                self.kv_caches, self._graph_batch(), warm_up_oom_message(self.config, self.tp.is_single)
            )
            if self.decode_graphs is not None:  # verify steps replay them too, a decode row per token
                self.input_builder.max_decode_rows = self.decode_graphs.max_batch
        return ModelFacts(
            max_model_len=self.max_model_len,
            vocab_size=self.shape.vocab_size,
            num_blocks=self.num_blocks,
            block_size=self.config.block_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            device=str(self.device),
            dtype=dtype_name(self.dtype),
            kv_cache_bits=self.kv_dtype.itemsize * 8,
            computes_prompt_logprobs=True,
            long_rope_after=self.input_builder.long_rope.after if self.input_builder.long_rope else None,
        )

    def _graph_batch(self) -> int | None:
        """The largest decode batch captured in a CUDA graph (None: no graphs)."""
        if not self._use_cuda_graphs():
            return None
        max_batch = graph_batch_limit(self.config.max_num_seqs, self.most_verify_rows)
        if self.config.max_num_seqs > max_batch:
            logger.info(
                "CUDA graphs: decode batches of up to %d requests are captured (--max-num-seqs %d); "
                "larger ones run eagerly",
                max_batch,
                self.config.max_num_seqs,
            )
        return max_batch

    def _max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.config.block_size)

    def _gpu_startup(self) -> GpuStartup:
        return GpuStartup(
            model=self.model,
            attn=self.attn,
            sampler=self.sampler,
            shape=self.shape,
            dtype=self.dtype,
            kv_dtype=self.kv_dtype,
            device=self.device,
            block_size=self.config.block_size,
            largest_step=LargestStep.of(
                self.max_num_batched_tokens,
                self.config.max_num_seqs,
                self.max_model_len,
                self.most_verify_rows,
            ),
            max_model_len=self.max_model_len,
            max_blocks_per_seq=self._max_blocks_per_seq(),
        )

    def _use_cuda_graphs(self) -> bool:
        if self.device.type != "cuda" or self.config.enforce_eager:
            return False
        if not self.tp.is_single:
            # Capturing NCCL all-reduces inside our decode graphs has not been run on a multi-GPU
            # machine yet; tensor-parallel decode stays eager until it has.
            logger.info("tensor parallel: CUDA graphs are off (decode runs eagerly)")
            return False
        return True

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its sampled tokens."""
        return self.execute_async(scheduled).result()

    @torch.inference_mode()
    def execute_async(self, scheduled: SchedulerOutput) -> PendingStepOutput | DeferredStepOutput:
        """Queue one step on the device and return without waiting for it (on CUDA).

        Placeholder token ids in the step are filled on the device from the previous step's sampled
        tokens. Steps must have their outputs read (result()) in launch order or not at all; a step
        that samples for a penalized request first waits for the previous step's tokens.

        Constrained rows' masks overlap the forward pass (runner/grammar.StepMasks). A step with
        constrained rows returns once its forward pass is queued: its sampling, which must wait for
        the masks, is queued in the next call once that call's inputs are built (or when its output
        is read), so the host schedules and builds the next step while the masks are computed."""
        # Before the inputs are built, and only then: an ended request's id may come back in this
        # very step, as a new request's.
        self.input_builder.drop(scheduled.finished_request_ids)
        inputs = self._inputs_beside_deferred(scheduled)
        self._update_states(scheduled)
        if scheduled.is_empty:
            # The sampler's last batch may be of requests just dropped (the core idles after this step).
            self.sampler.forget_batch()
            return PendingStepOutput.ready()
        if inputs is None:
            inputs = self.input_builder.build(scheduled, self._previous)
        request_ids = tuple(inputs.sample_request_ids)
        masks = self.masks.start(request_ids)
        inputs.prompt_logprob_rows = self.prompt_logprobs.rows(scheduled, self.states)
        logits = self._forward(inputs)
        if not request_ids:
            self.masks.result(masks, self._resolve_outputs)  # the matchers are free again
            self._previous = None
            return PendingStepOutput.ready()
        token_rows = {request_id: row for row, request_id in enumerate(request_ids)}
        prompt_logprobs = self.prompt_logprobs.finished(token_rows)
        forward = LaunchedForward(
            scheduled, request_ids, token_rows, inputs.has_drafts, logits, masks, prompt_logprobs
        )
        if not masks.request_ids:
            return self._sample(forward)
        self._deferred = DeferredStepOutput(lambda: self._sample(forward), token_rows)
        return self._deferred

    def _inputs_beside_deferred(self, scheduled: SchedulerOutput) -> StepInputs | None:
        """Queue the sampling of the step launched last if it waits for its masks, having built this
        step's inputs first (all but their placeholders, which take its tokens): the host does that
        work while the masks finish. None when no step was deferred or this one runs nothing."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return None
        built = None
        if not scheduled.is_empty:
            built = self.input_builder.build_unfilled(scheduled, deferred.token_rows)
        deferred.sample()
        if built is None:
            return None
        inputs, fill = built
        fill.apply(inputs.input_ids, self._previous)
        return inputs

    @torch.inference_mode()
    def _sample(self, forward: LaunchedForward) -> PendingStepOutput:
        """Queue a launched step's sampling (after its grammar masks, if it has constrained rows); also
        called from DeferredStepOutput.result(), outside execute_async."""
        grammar = self.masks.result(forward.masks, self._resolve_outputs)
        states, verification = self._row_states(forward.scheduled, forward.request_ids, forward.has_drafts)
        if self._penalized_ids:
            self._resolve_outputs()  # penalties need real token ids, not placeholders
        token_ids, packed = self.sampler.sample_on_device(
            forward.logits, states, logits_are_scratch=True, grammar=grammar
        )
        failures = self.masks.sequences.failures.take if forward.masks.request_ids else None
        pending = PendingStepOutput(
            forward.request_ids, states, token_ids, packed, verification, forward.prompt_logprobs, failures
        )
        self._previous = PreviousTokens(token_ids, forward.token_rows)
        self._unresolved = [p for p in self._unresolved if not p.is_resolved]
        self._unresolved.append(pending)
        if forward.masks.request_ids and packed is None and verification is None:
            self.masks.prefetch(forward.masks, pending)
        return pending

    def _row_states(
        self, scheduled: SchedulerOutput, request_ids: tuple[str, ...], has_drafts: bool
    ) -> tuple[list[SamplingState], Verification | None]:
        """Each sampled row's state; with verify chunks, also what turns their rows into accepted drafts."""
        if not has_drafts:
            return [self.states[request_id] for request_id in request_ids], None
        groups = verify_groups(scheduled)
        verification = Verification(tuple(groups), {g.request_id: self.states[g.request_id] for g in groups})
        return row_states(self.states, request_ids, groups), verification

    def _resolve_outputs(self) -> None:
        """Wait for every launched step's tokens, so that the states hold no placeholders."""
        for pending in self._unresolved:
            pending.result()
        self._unresolved = []

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """The sampled rows' logits; rows of prompts whose logprobs were asked also give those (eagerly)."""
        prompt_rows = inputs.prompt_logprob_rows
        if not prompt_rows and self.fused_decode is not None and self.fused_decode.can_run(inputs):
            return self.fused_decode.run(inputs)
        if not prompt_rows and self.decode_graphs is not None and self.decode_graphs.can_run(inputs.meta):
            logits = self.decode_graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
            # Decodes and verify rows all sample; a one-token prompt chunk (a budget's last token) does not.
            every_row_samples = inputs.sample_indices.shape[0] == logits.shape[0]
            return logits if every_row_samples else logits[inputs.sample_indices]
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.attn)
        for rows in prompt_rows:
            self.prompt_logprobs.read(hidden, rows, self.model.compute_logits)
        return self.model.compute_logits(hidden[inputs.sample_indices])

    def _update_states(self, scheduled: SchedulerOutput) -> None:
        for request_id in scheduled.finished_request_ids:
            self.states.pop(request_id, None)
            self._penalized_ids.discard(request_id)
        self.prompt_logprobs.drop(scheduled.finished_request_ids)
        if len(self.grammars):
            self.grammars.drop(scheduled.finished_request_ids)
            self.masks.drop(scheduled.finished_request_ids)
        for new in scheduled.new_requests:
            state = self.states[new.request_id] = SamplingState.create(
                new.sampling_params,
                new.seed,
                list(new.prompt_token_ids),
                list(new.output_token_ids),
                new.eos_token_ids,
                self.device,
            )
            if has_penalty(state):
                self._penalized_ids.add(new.request_id)
            self.prompt_logprobs.start(new)
            spec = new.sampling_params.structured_outputs
            if spec is not None:
                self.grammars.add(new.request_id, spec, state.output_token_ids, new.eos_token_ids)
