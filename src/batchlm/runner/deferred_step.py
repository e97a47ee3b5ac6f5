"""A launched step whose sampling is queued later: its forward pass is on the device, but its grammar
masks wait for the previous step's tokens, so its sampling is queued when the runner is next called
(or its output is read), and the host schedules the next step and builds its inputs while the masks
are computed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
from batchlm.outputs import TokenLogprobs
from batchlm.runner.grammar import StartedMasks
from batchlm.runner.step_output import PendingStepOutput


@dataclass(frozen=True)
class LaunchedForward:
    """What sampling a step needs once its forward pass is queued."""

    scheduled: SchedulerOutput
    # The sampled rows' request ids, in row order.
    request_ids: tuple[str, ...]
    # Request id -> its row among them (where the next step's placeholders take their tokens).
    token_rows: dict[str, int]
    has_drafts: bool
    # [rows, vocab] float32 on the device (scratch the sampler may overwrite).
    logits: torch.Tensor
    masks: StartedMasks
    # Requests sampling their first token whose prompt's logprobs were asked: request id -> them.
    prompt_logprobs: Mapping[str, tuple[TokenLogprobs, ...]]


class DeferredStepOutput:
    """A step's output whose sampling `sample` queues on first use: by the runner before it launches
    the next step, or by result() when the output is read first. Engine thread only."""

    def __init__(self, sample: Callable[[], PendingStepOutput], token_rows: dict[str, int]) -> None:
        # Dropped once called: it holds the runner, which holds this step (a cycle while it is held).
        self._sample: Callable[[], PendingStepOutput] | None = sample
        # Request id -> its row among the step's sampled tokens.
        self.token_rows = token_rows
        self._pending: PendingStepOutput | None = None

    @property
    def is_sampled(self) -> bool:
        return self._pending is not None

    def sample(self) -> PendingStepOutput:
        """Queue the step's sampling (once) and return its pending output."""
        if self._pending is None:
            sample, self._sample = self._sample, None
            assert sample is not None
            self._pending = sample()
        return self._pending

    def result(self) -> ModelRunnerOutput:
        return self.sample().result()
