"""Prompt log-probabilities (SamplingParams.prompt_logprobs) on the runner's side: which rows of a step
predict a prompt token of a request that asked, their logits read a slice of rows at a time, and the
entries gathered per request across its prompt's chunks until it samples its first token."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from batchlm.core.step_io import NewRequestData, SchedulerOutput
from batchlm.outputs import TokenLogprobs
from batchlm.sampling.logprobs import target_logprobs
from batchlm.sampling.state import SamplingState

# Prompt rows whose logits are made at once for their logprobs: [rows, vocab] float32 (twice, with the
# log-softmax) stays within what the start-up profile left beside the KV cache, at 128k-token vocabularies.
PROMPT_LOGPROB_ROWS = 128


@dataclass(frozen=True)
class PromptLogprobRows:
    """Rows of a step's tokens whose logits give a prompt's logprobs: each predicts the next prompt token."""

    request_id: str
    first_row: int
    # The prompt tokens the rows predict, in order (one a row).
    targets: list[int]
    # How many alternatives each entry lists (SamplingParams.prompt_logprobs).
    num_top: int


class PromptLogprobs:
    """The requests gathering their prompt's logprobs, and what each has gathered so far."""

    def __init__(self) -> None:
        self._gathered: dict[str, list[TokenLogprobs]] = {}

    def start(self, new: NewRequestData) -> None:
        """A request the runner takes on; one recomputed after its first token reported them already."""
        if new.sampling_params.prompt_logprobs is not None and not new.output_token_ids:
            self._gathered[new.request_id] = []

    def drop(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._gathered.pop(request_id, None)

    def rows(
        self, scheduled: SchedulerOutput, states: Mapping[str, SamplingState]
    ) -> list[PromptLogprobRows]:
        """The step's rows that predict a prompt token of a request gathering its prompt's logprobs."""
        found: list[PromptLogprobRows] = []
        if not self._gathered:
            return found
        first_row = 0
        for chunk in scheduled.chunks:
            if chunk.request_id in self._gathered:
                state = states[chunk.request_id]
                start, prompt, num_top = (
                    chunk.start_position,
                    state.prompt_token_ids,
                    state.params.prompt_logprobs,
                )
                assert num_top is not None
                count = min(len(chunk.token_ids), len(prompt) - 1 - start)
                if count > 0:
                    targets = prompt[start + 1 : start + 1 + count]
                    found.append(PromptLogprobRows(chunk.request_id, first_row, targets, num_top))
            first_row += len(chunk.token_ids)
        return found

    def read(
        self,
        hidden: torch.Tensor,
        rows: PromptLogprobRows,
        compute_logits: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Add the logprobs of the prompt tokens these rows predict to the request's, a slice at a time."""
        gathered = self._gathered[rows.request_id]
        for offset in range(0, len(rows.targets), PROMPT_LOGPROB_ROWS):
            targets = rows.targets[offset : offset + PROMPT_LOGPROB_ROWS]
            first = rows.first_row + offset
            raw = torch.log_softmax(compute_logits(hidden[first : first + len(targets)]).float(), dim=-1)
            gathered += target_logprobs(raw, torch.tensor(targets, device=raw.device), rows.num_top)

    def finished(self, sampling: Iterable[str]) -> dict[str, tuple[TokenLogprobs, ...]]:
        """The prompts' logprobs of the requests among `sampling` (those that sample this step): their
        first token is sampled now, so their prompt is complete."""
        return {
            request_id: tuple(self._gathered.pop(request_id))
            for request_id in sampling
            if request_id in self._gathered
        }
