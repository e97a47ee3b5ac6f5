"""The sampled tokens of a launched step: copied to the host without blocking, awaited only when read."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID, ModelRunnerOutput
from batchlm.outputs import TokenLogprobs
from batchlm.runner.draft_verify import Verification
from batchlm.sampling.logprobs import unpack_logprobs
from batchlm.sampling.state import SamplingState

EMPTY_OUTPUT = ModelRunnerOutput((), (), ())


@dataclass(frozen=True)
class PreviousTokens:
    """What the next step needs to fill its placeholder token ids on the device."""

    # [S] int64 on the device: the tokens the step sampled, one per sampled row.
    token_ids: torch.Tensor
    # Request id -> its row in token_ids.
    rows: dict[str, int]


class PendingStepOutput:
    """One step's ModelRunnerOutput, still on its way from the device.

    Created right after the step's sampling kernels are queued: it queues their copy into pinned host
    memory and records an event. result() waits for that event once, writes the real token ids over
    the placeholders the runner appended to each request's SamplingState, and caches the output.
    """

    def __init__(
        self,
        request_ids: tuple[str, ...],
        states: Sequence[SamplingState],
        token_ids: torch.Tensor,
        packed_logprobs: torch.Tensor | None,
        verification: Verification | None = None,
        prompt_logprobs: Mapping[str, tuple[TokenLogprobs, ...]] | None = None,
        grammar_failures: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        """grammar_failures: takes the constrained requests whose grammar failed (request id -> error),
        called once the step's tokens are on the host: by then the masks it sampled under are made,
        and so are those masks' failures."""
        self._request_ids = request_ids
        self._grammar_failures = grammar_failures
        self._verification = verification
        self._prompt_logprobs = prompt_logprobs
        self._states = list(states)
        # Where each state's placeholder sits in its output_token_ids (appended now, filled by result()).
        self._slots = []
        for state in self._states:
            self._slots.append(len(state.output_token_ids))
            state.output_token_ids.append(PLACEHOLDER_TOKEN_ID)
        source = packed_logprobs if packed_logprobs is not None else token_ids  # [S] or [S, columns]
        self._has_logprobs = packed_logprobs is not None
        self._event: torch.cuda.Event | None = None
        if source.device.type == "cuda":
            self._host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            self._host.copy_(source, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = source
        self._output: ModelRunnerOutput | None = None

    @classmethod
    def ready(cls, output: ModelRunnerOutput = EMPTY_OUTPUT) -> PendingStepOutput:
        """An already-known output (a step that sampled nothing)."""
        pending = cls.__new__(cls)
        pending._output = output
        return pending

    @property
    def is_resolved(self) -> bool:
        return self._output is not None

    @property
    def positions(self) -> tuple[int, ...]:
        """Where each row's token sits in its request's output_token_ids."""
        return tuple(self._slots)

    def peek_token_ids(self) -> list[int] | None:
        """The step's token ids once the device has them, writing nothing (safe on another thread);
        None when they travel packed with logprobs."""
        if self._output is not None:
            return list(self._output.sampled_token_ids)
        if self._has_logprobs:
            return None
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()

    def result(self) -> ModelRunnerOutput:
        """Wait for the step's tokens (once) and return them."""
        if self._output is None:
            self._output = self._resolve()
        return self._output

    def _resolve(self) -> ModelRunnerOutput:
        if self._event is not None:
            self._event.synchronize()
        logprobs: list[TokenLogprobs | None]
        if self._has_logprobs:
            token_ids, logprobs = unpack_logprobs(self._host.tolist(), self._states)
        else:
            token_ids = self._host.tolist()
            logprobs = [None] * len(token_ids)
        for state, slot, token_id in zip(self._states, self._slots, token_ids, strict=True):
            state.output_token_ids[slot] = token_id
        self._states = []  # the states may be dropped by the runner now; hold no references
        if self._verification is not None:
            verification, self._verification = self._verification, None
            output = verification.output(self._request_ids, token_ids, logprobs)
        else:
            output = ModelRunnerOutput(self._request_ids, tuple(token_ids), tuple(logprobs))
        if self._prompt_logprobs:
            output = replace(output, prompt_logprobs=self._prompt_logprobs)
        if self._grammar_failures is not None and (failed := self._grammar_failures()):
            output = replace(output, grammar_failures=failed)
        return output
