"""Logit processors applied before temperature: logit_bias, min_tokens masking, and the repetition,
presence and frequency penalties (with incrementally kept per-request token counts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from batchlm.sampling.plan import SamplingPlan, to_device
from batchlm.sampling.state import SamplingState, TokenStats


def apply_logit_bias(logits: torch.Tensor, plan: SamplingPlan) -> None:
    """Add each request's logit_bias to its row, in place. logits: [B, V]."""
    if not plan.bias_rows:
        return
    rows = to_device(plan.bias_rows, torch.int64, logits.device)  # [N]
    token_ids = to_device(plan.bias_token_ids, torch.int64, logits.device)  # [N]
    values = to_device(plan.bias_values, logits.dtype, logits.device)  # [N]
    logits.index_put_((rows, token_ids), values, accumulate=True)


def apply_min_tokens_ban(logits: torch.Tensor, plan: SamplingPlan) -> None:
    """Set EOS / stop-token logits to -inf for rows still short of min_tokens, in place."""
    if not plan.banned_rows:
        return
    rows = to_device(plan.banned_rows, torch.int64, logits.device)  # [N]
    token_ids = to_device(plan.banned_token_ids, torch.int64, logits.device)  # [N]
    logits.index_put_((rows, token_ids), logits.new_full((), float("-inf")))


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState], plan: SamplingPlan) -> None:
    """Apply the repetition / presence / frequency penalties of plan.penalty_rows, in place."""
    if not plan.penalty_rows:
        return
    device, vocab_size = logits.device, logits.shape[1]
    penalized = [states[row] for row in plan.penalty_rows]
    counts, prompt_mask = collect_token_stats(penalized, vocab_size, device)
    factors = to_device(
        [
            [s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty]
            for s in penalized
        ],
        logits.dtype,
        device,
    )  # [P, 3]
    if len(penalized) == logits.shape[0]:
        penalize(logits, counts, prompt_mask, factors)
        return
    row_index = to_device(plan.penalty_rows, torch.int64, device)  # [P]
    subset = logits.index_select(0, row_index)  # [P, V]
    penalize(subset, counts, prompt_mask, factors)
    logits.index_copy_(0, row_index, subset)


def penalize(
    logits: torch.Tensor, counts: torch.Tensor, prompt_mask: torch.Tensor, factors: torch.Tensor
) -> None:
    """The penalty formulas, in place on logits [P, V].

    counts [P, V]: occurrences of each token in the output; prompt_mask [P, V]: token in the prompt;
    factors [P, 3]: (repetition, presence, frequency) per row.
    Repetition (Hugging Face): a logit of a token seen in prompt or output is divided by the penalty
    when positive, multiplied when negative. Presence / frequency (OpenAI, output tokens only):
    logit -= presence * (count > 0) + frequency * count.
    """
    repetition, presence, frequency = (column.unsqueeze(1) for column in factors.unbind(1))  # [P, 1] each
    in_output = counts > 0  # [P, V]
    scale = torch.where(prompt_mask | in_output, repetition, 1.0)  # [P, V]
    logits.copy_(torch.where(logits > 0, logits / scale, logits * scale))
    logits.sub_(presence * in_output + frequency * counts)


def collect_token_stats(
    states: Sequence[SamplingState], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring each state's TokenStats up to date; return output counts [P, V] int32 and prompt mask
    [P, V] bool, one row per state.

    Incremental bookkeeping: a prompt is scattered once in a request's life and each call scatters
    only the output tokens appended since the previous call (usually one per row), so the host work
    is O(new tokens), not O(all tokens). The stacked tensors become the states' new stats as row
    views, so each call's tensors stay alive until every row has been re-stacked (next call) or its
    request has left; in steady state that is two [P, V] tensors.
    """
    count_rows: list[torch.Tensor] = []
    mask_rows: list[torch.Tensor] = []
    scatter = _ScatterLists()
    for row, state in enumerate(states):
        stats = state.token_stats
        if stats is None:
            count_rows.append(torch.zeros(vocab_size, dtype=torch.int32, device=device))
            mask_rows.append(torch.zeros(vocab_size, dtype=torch.bool, device=device))
            scatter.add_prompt(row, state.prompt_token_ids, vocab_size)
            num_counted = 0
        else:
            count_rows.append(stats.output_counts)
            mask_rows.append(stats.prompt_mask)
            num_counted = stats.num_counted
        scatter.add_outputs(row, state.output_token_ids, num_counted, vocab_size)
    counts = torch.stack(count_rows)  # [P, V] int32
    prompt_mask = torch.stack(mask_rows)  # [P, V] bool
    scatter.apply(counts, prompt_mask)
    # unbind makes all row views in one call (indexing row by row costs microseconds each).
    for state, state_counts, state_mask in zip(states, counts.unbind(0), prompt_mask.unbind(0), strict=True):
        state.token_stats = TokenStats(state_counts, state_mask, state.num_generated)
    return counts, prompt_mask


class _ScatterLists:
    """Flat (row, token id) lists of the tokens to fold into the stacked stats this call."""

    def __init__(self) -> None:
        self.prompt_rows: list[int] = []
        self.prompt_ids: list[int] = []
        self.output_rows: list[int] = []
        self.output_ids: list[int] = []

    def add_prompt(self, row: int, prompt: list[int], vocab_size: int) -> None:
        _check_token_ids(prompt, vocab_size, "prompt")
        self.prompt_rows.extend([row] * len(prompt))
        self.prompt_ids.extend(prompt)

    def add_outputs(self, row: int, outputs: list[int], num_counted: int, vocab_size: int) -> None:
        if len(outputs) < num_counted:
            raise RuntimeError(
                f"output_token_ids shrank from {num_counted} to {len(outputs)} tokens; "
                "a request whose outputs are rewound needs a fresh SamplingState"
            )
        fresh = outputs[num_counted:]
        _check_token_ids(fresh, vocab_size, "output")
        self.output_rows.extend([row] * len(fresh))
        self.output_ids.extend(fresh)

    def apply(self, counts: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        device = counts.device
        if self.prompt_ids:
            rows = to_device(self.prompt_rows, torch.int64, device)
            token_ids = to_device(self.prompt_ids, torch.int64, device)
            prompt_mask.index_put_((rows, token_ids), prompt_mask.new_ones(()))
        if self.output_ids:
            rows = to_device(self.output_rows, torch.int64, device)
            token_ids = to_device(self.output_ids, torch.int64, device)
            ones = torch.ones(len(self.output_ids), dtype=counts.dtype, device=device)
            counts.index_put_((rows, token_ids), ones, accumulate=True)


def _check_token_ids(token_ids: list[int], vocab_size: int, what: str) -> None:
    # Prompt ids were validated by the input processor and outputs are sampled: asserted on the host,
    # where a slip reads better than the device-side assert an out-of-range index would raise.
    assert not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size), (
        f"{what} token ids outside the vocabulary [0, {vocab_size})"
    )
