"""The batched sampler: per-request logit processing, temperature, truncation, seeded sampling and
logprobs for a whole batch, with exactly one device->host copy per call."""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from batchlm.kernels import cpu_sampling
from batchlm.outputs import TokenLogprobs
from batchlm.sampling.filters import apply_min_p, apply_top_k_top_p
from batchlm.sampling.grammar_mask import BitmaskStaging, apply_grammar_masks, masks_in_place
from batchlm.sampling.logprobs import MAX_PACKED_VOCAB, pack_logprobs, unpack_logprobs
from batchlm.sampling.penalties import apply_logit_bias, apply_min_tokens_ban, apply_penalties
from batchlm.sampling.plan import SamplingPlan, plan_batch, to_device
from batchlm.sampling.state import SamplingState, resolve_device, seed_for_step
from batchlm.structured.step_masks import GrammarMasks

# Above this many logits per call the race kernel's int32 noise offsets would overflow: torch path.
MAX_RACE_ELEMENTS = 2**31 - 1


def load_race_kernel() -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
    """The Triton race (sampling/race_kernel.py), or None without Triton or with BATCHLM_DISABLE_FUSED_OPS
    or BATCHLM_DISABLE_FUSED_SAMPLING set (then every row takes the torch race)."""
    if os.environ.get("BATCHLM_DISABLE_FUSED_OPS") or os.environ.get("BATCHLM_DISABLE_FUSED_SAMPLING"):
        return None
    try:
        from batchlm.sampling.race_kernel import race
    except ImportError:  # no Triton: the torch race
        return None
    return race


@dataclass
class SamplerOutput:
    """The tokens chosen for one batch, row i for states[i]."""

    # [B] int64 on the logits' device (feeds the next step without a round trip).
    token_ids: torch.Tensor
    # The same ids on the host.
    token_ids_cpu: list[int]
    # Per row; None where the request did not ask for logprobs.
    logprobs: list[TokenLogprobs | None]


class Sampler:
    """Chooses one token per row of a logits batch, each row under its own SamplingParams.

    Order: grammar masks (constrained rows); logprobs from those logits; logit_bias; min_tokens ban;
    repetition penalty; presence and frequency penalties; then greedy rows take the argmax and the
    others go through temperature, top-k, top-p, min-p and an exponential race. Logits columns past
    `vocab_size` (vocabulary padding) are never sampled. The caller's logits are never modified
    unless it says they are scratch.

    A batch of the same states as the previous call reuses that call's plan and per-row knobs (a
    decode batch is usually unchanged from step to step), unless a min_tokens ban is still active.
    """

    def __init__(self, vocab_size: int, device: torch.device | str, seed: int = 0) -> None:
        if not 0 < vocab_size <= MAX_PACKED_VOCAB:
            raise ValueError(f"vocab_size must be in [1, {MAX_PACKED_VOCAB}], got {vocab_size}")
        self.vocab_size = vocab_size
        self.device = resolve_device(device)
        # Noise for unseeded requests.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        # CUDA: the one-pass race kernel for unfiltered rows, its unseeded rows on Philox(seed, call).
        self._race = load_race_kernel() if self.device.type == "cuda" else None
        self._seed = seed
        self._num_races = 0
        # The last batch's states (held, so their ids stay unique), its plan and knobs [B, 5].
        self._cached: tuple[tuple[SamplingState, ...], SamplingPlan, torch.Tensor | None] | None = None
        self._staging: BitmaskStaging | None = None

    def warm_up(self, logits: torch.Tensor) -> None:
        """Compile the race kernel at start-up (else the first sampled step waits for it), for the
        raw logits and for processed (float32) ones. logits: [1, >= vocab_size], as the model makes
        them."""
        if self._race is not None:
            view = logits[:, : self.vocab_size]
            temperature = torch.ones(1, dtype=torch.float32, device=self.device)
            for dtype in {view.dtype, torch.float32}:
                self._race(view.to(dtype), temperature, 1 << 62)

    def __call__(
        self, logits: torch.Tensor, states: Sequence[SamplingState], grammar: GrammarMasks | None = None
    ) -> SamplerOutput:
        """Sample one token per row. logits: [B, >= vocab_size], row i belonging to states[i]."""
        token_ids, packed = self.sample_on_device(logits, states, grammar=grammar)
        # The call's single device->host copy: token ids, with the logprob data when asked for.
        if packed is None:
            token_ids_cpu = token_ids.tolist()
            return SamplerOutput(token_ids, token_ids_cpu, [None] * len(token_ids_cpu))
        token_ids_cpu, logprobs = unpack_logprobs(packed.tolist(), states)
        return SamplerOutput(token_ids, token_ids_cpu, logprobs)

    def sample_on_device(
        self,
        logits: torch.Tensor,
        states: Sequence[SamplingState],
        logits_are_scratch: bool = False,
        grammar: GrammarMasks | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything but the host copy: token ids [B] int64 and, when any row wants logprobs, the
        packed logprob tensor (see logprobs.pack_logprobs). Never waits on the device.

        logits: the model's dtype; they are widened to float32 only when a processor or logprobs
        must see them (masks, greedy rows and the race take them as they are). logits_are_scratch:
        the caller will not read `logits` again, so they may be overwritten (saves a full copy of the
        batch's logits). grammar: the constrained rows' masks, applied first, so logprobs and every
        later processor see the masked distribution."""
        logits = self._checked_view(logits, states)
        plan, knobs = self._plan(states)
        owned = logits_are_scratch
        if grammar is not None and grammar.rows:
            if not masks_in_place(logits):
                logits, owned = logits.float(), True
            elif not owned:
                logits, owned = logits.clone(), True
            apply_grammar_masks(logits, grammar, self.grammar_staging(grammar.bitmask.shape[1]))
        if not (plan.changes_logits or plan.max_logprobs is not None):
            if knobs is None:  # every row greedy
                return logits.argmax(dim=-1), None
            if self._races(logits, plan):
                return self._fused_race(logits, states, plan, knobs), None
        if logits.dtype != torch.float32:
            logits, owned = logits.float(), True  # a widened copy is ours to overwrite
        raw_logprobs = None if plan.max_logprobs is None else logits.log_softmax(dim=-1)
        processed = self._process(logits, states, plan, copy=not owned)
        token_ids = self._choose_tokens(processed, states, plan, knobs)
        if raw_logprobs is None or plan.max_logprobs is None:
            return token_ids, None
        return token_ids, pack_logprobs(raw_logprobs, token_ids, plan.max_logprobs)

    def grammar_staging(self, words: int) -> BitmaskStaging | None:
        """The pinned ring that bitmasks of this width travel through to a GPU (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        if self._staging is None or self._staging.words != words:
            self._staging = BitmaskStaging(self.device, words)
        return self._staging

    def process_logits(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """The logits after logit_bias, the min_tokens ban and the penalties: a new [B, vocab_size]
        tensor, the distribution that temperature and the filters then act on."""
        logits = self._checked_view(logits, states).float()
        return self._process(logits, states, plan_batch(states, self.vocab_size), copy=True)

    def forget_batch(self) -> None:
        """Let go of the last batch's states (their penalty tensors among them): the next call plans anew."""
        self._cached = None

    def _plan(self, states: Sequence[SamplingState]) -> tuple[SamplingPlan, torch.Tensor | None]:
        """The batch's plan and its random rows' knobs on the device, reused from the last call when
        the batch is the same states in the same order and the plan cannot have changed since."""
        cached = self._cached
        if cached is not None and len(cached[0]) == len(states) and all(map(operator.is_, cached[0], states)):
            return cached[1], cached[2]
        plan = plan_batch(states, self.vocab_size)
        knobs = None
        if not plan.all_greedy:
            knobs = to_device([_row_knobs(state) for state in states], torch.float32, self.device)  # [B, 5]
        self._cached = None if plan.varies_by_step else (tuple(states), plan, knobs)
        return plan, knobs

    def _checked_view(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(states) or logits.shape[1] < self.vocab_size:
            raise ValueError(
                f"logits must have shape [num_states={len(states)}, >= vocab_size={self.vocab_size}], "
                f"got {tuple(logits.shape)}"
            )
        if logits.device != self.device:
            raise ValueError(f"logits are on {logits.device} but the sampler was built for {self.device}")
        # Columns past the tokenizer's vocabulary are padding: cut them off so they are never chosen.
        return logits[:, : self.vocab_size]  # [B, V]

    def _process(
        self, logits: torch.Tensor, states: Sequence[SamplingState], plan: SamplingPlan, copy: bool
    ) -> torch.Tensor:
        processed = logits.clone(memory_format=torch.contiguous_format) if copy else logits  # [B, V]
        apply_logit_bias(processed, plan)
        apply_min_tokens_ban(processed, plan)
        apply_penalties(processed, states, plan)
        return processed

    def _choose_tokens(
        self,
        processed: torch.Tensor,
        states: Sequence[SamplingState],
        plan: SamplingPlan,
        knobs: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token ids [B]: argmax for greedy rows, a random draw for the others."""
        if plan.all_greedy or knobs is None:
            return processed.argmax(dim=-1)
        if self._races(processed, plan):  # greedy rows race at temperature 0: no argmax pass of their own
            return self._fused_race(processed, states, plan, knobs)
        num_rows = processed.shape[0]
        greedy = None if len(plan.random_rows) == num_rows else processed.argmax(dim=-1)  # [B]
        temperature, top_k, top_p, min_p, is_random = knobs.unbind(1)  # [B] each
        noise_scale = None
        if plan.any_top_p or plan.any_min_p:
            # These filters act on the tempered distribution.
            processed.div_(temperature.unsqueeze(1))
        else:
            # Top-k alone keeps the same tokens at any temperature, and the race below gives the same
            # winner for logits/T - log E as for logits - T * log E: no pass to divide the logits.
            noise_scale = temperature.unsqueeze(1)  # [B, 1]
        apply_top_k_top_p(processed, top_k.long(), plan.max_top_k, top_p if plan.any_top_p else None)
        if plan.any_min_p:
            apply_min_p(processed, min_p)
        if cpu_sampling.supports(processed):
            sampled = self._inverse_cdf(processed, states, plan, noise_scale)
        else:
            sampled = self._exponential_race(processed, states, plan, noise_scale)  # [B]
        return sampled if greedy is None else torch.where(is_random.bool(), sampled, greedy)

    def _inverse_cdf(
        self,
        logits: torch.Tensor,
        states: Sequence[SamplingState],
        plan: SamplingPlan,
        noise_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """The CPU draw (kernels/cpu_sampling.py): softmax(logits / T) by inverse CDF with one uniform
        per row, T = noise_scale (1 when the logits were already divided). Like the race, unseeded rows
        share the sampler's generator and a seeded row's draw comes only from its own generator."""
        rows = logits.shape[0]
        uniforms = torch.empty(rows, dtype=torch.float64)
        if len(plan.seeded_rows) < rows:
            uniforms.uniform_(generator=self.generator)
        for row in plan.seeded_rows:
            uniforms[row] = torch.rand((), dtype=torch.float64, generator=self._row_generator(states, row))
        temperature = noise_scale[:, 0] if noise_scale is not None else torch.ones(rows)
        return cpu_sampling.sample_rows(logits, temperature, uniforms)

    def _row_generator(self, states: Sequence[SamplingState], row: int) -> torch.Generator:
        """A seeded row's own generator, re-seeded for this token; it must live on the logits' device."""
        generator = states[row].generator_for_next_token()
        assert generator is not None
        if generator.device != self.device and resolve_device(generator.device) != self.device:
            raise ValueError(f"row {row}'s generator is on {generator.device}, logits on {self.device}")
        return generator

    def _races(self, logits: torch.Tensor, plan: SamplingPlan) -> bool:
        """Whether the race kernel draws this batch: no row filters its distribution."""
        filtered = plan.max_top_k > 0 or plan.any_top_p or plan.any_min_p
        return self._race is not None and not filtered and logits.numel() <= MAX_RACE_ELEMENTS

    def _fused_race(
        self,
        processed: torch.Tensor,
        states: Sequence[SamplingState],
        plan: SamplingPlan,
        knobs: torch.Tensor,
    ) -> torch.Tensor:
        """The race in one kernel pass (greedy rows have temperature 0: a plain argmax); seeded rows
        are then raced again on their own generators' noise, exactly as the torch path races them.
        processed: float32, or the model's raw logits (widened in the kernel's registers)."""
        assert self._race is not None
        temperature, _, _, _, is_random = knobs.unbind(1)
        temperature = temperature * is_random  # [B]: 0 for greedy rows
        seed = seed_for_step(self._seed, self._num_races) | (1 << 62)  # always a 64-bit kernel argument
        self._num_races += 1
        token_ids = self._race(processed, temperature, seed)  # [B]
        if plan.seeded_rows:
            rows = to_device(plan.seeded_rows, torch.int64, self.device)  # [S]
            seeded = processed.index_select(0, rows).float()  # [S, V]
            seeded_plan = SamplingPlan(seeded_rows=list(range(len(plan.seeded_rows))))
            seeded_states = [states[row] for row in plan.seeded_rows]
            scale = temperature.index_select(0, rows).unsqueeze(1)  # [S, 1]
            token_ids.index_copy_(0, rows, self._exponential_race(seeded, seeded_states, seeded_plan, scale))
        return token_ids

    def _exponential_race(
        self,
        logits: torch.Tensor,
        states: Sequence[SamplingState],
        plan: SamplingPlan,
        noise_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """argmax(probs / E) with E ~ Exponential(1) per token draws exactly from probs. It is taken
        in log space as argmax(logits - log E): the softmax normaliser is a per-row constant, so no
        softmax is needed and every step but the final argmax is elementwise (batch-invariant).
        noise_scale [B, 1] (the temperature, when the logits were not divided by it) scales log E."""
        noise = torch.empty_like(logits)  # [B, V]
        if len(plan.seeded_rows) < logits.shape[0]:
            fill_exponential(noise, self.generator)
        for row in plan.seeded_rows:
            # A seeded row's noise comes only from its own generator.
            fill_exponential(noise[row], self._row_generator(states, row))
        # Exponential draws of exactly 0 would give log 0 = -inf and an undefined race.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny).log_()
        if noise_scale is None:
            return logits.sub_(noise).argmax(dim=-1)
        return logits.addcmul_(noise, noise_scale, value=-1.0).argmax(dim=-1)


def fill_exponential(out: torch.Tensor, generator: torch.Generator | None) -> None:
    """Fill `out` with Exponential(1) draws. On CPU they are -log(U) of float64 uniforms: torch's CPU
    exponential_ is several times slower than this way (BENCHMARKS.md, "Figures that left the
    source"). (U = 0, at odds of 2^-53, gives +inf: that token cannot win.)"""
    if out.device.type != "cpu":
        out.exponential_(generator=generator)
        return
    uniform = torch.empty(out.shape, dtype=torch.float64).uniform_(generator=generator)
    out.copy_(uniform.log_().neg_())


def _row_knobs(state: SamplingState) -> list[float]:
    """(temperature, top_k, top_p, min_p, is_random) for one row; greedy rows get neutral values."""
    params = state.params
    if params.greedy:
        return [1.0, 0.0, 1.0, 0.0, 0.0]
    return [params.temperature, float(params.top_k), params.top_p, params.min_p, 1.0]
