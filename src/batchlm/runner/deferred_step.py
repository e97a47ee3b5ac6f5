"""A launched step whose sampling is queued later: its forward pass is on the device, but its grammar
masks wait for the previous step's tokens, so its sampling is queued by the mask worker once they are
ready, while the engine thread schedules the next step and builds its inputs."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
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


class DeferredStepOutput:
    """A step's output whose sampling runs on the mask worker, queued there right after the step's
    masks, so that it reaches the device as soon as they are ready rather than when the engine thread
    next calls the runner. The runner waits for it before launching the next step; result() waits
    for it too."""

    def __init__(self, sampled: Future[PendingStepOutput], token_rows: dict[str, int]) -> None:
        self._sampled = sampled
        # Request id -> its row among the step's sampled tokens.
        self.token_rows = token_rows

    @property
    def is_sampled(self) -> bool:
        return self._sampled.done()

    def sample(self) -> PendingStepOutput:
        """The step's pending output, once its sampling is queued on the device."""
        return self._sampled.result()

    def result(self) -> ModelRunnerOutput:
        return self.sample().result()
