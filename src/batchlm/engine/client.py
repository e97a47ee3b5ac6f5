"""The interface the HTTP server uses to talk to an engine (PyTorch async engine or the MLX backend)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchlm.core.facts import EngineStats as EngineStats  # the type EngineClient.stats returns
from batchlm.core.facts import ModelFacts
from batchlm.outputs import RequestOutput
from batchlm.sampling_defaults import SamplingDefaults
from batchlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from batchlm.engine.input_processor import InputProcessor, ValidatedRequest
    from batchlm.tokenizer.tokenizer import Tokenizer


class EngineDeadError(RuntimeError):
    """The engine stopped (crashed or shut down); no request can be served."""


class RequestRejectedError(ValueError):
    """A request the engine refuses before running it (a client error: HTTP 400).
    `param` names the offending field where there is one; `code` is OpenAI's error code, if any."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFullError(RuntimeError):
    """Too many requests are waiting (HTTP 429)."""


@dataclass(frozen=True)
class ServedModel:
    """The loaded model as the API names it, with its facts (limits, vocabulary) as the core reported them."""

    # Name the API reports and accepts in the `model` field.
    served_model_name: str
    facts: ModelFacts
    # Aliases also accepted in the `model` field (e.g. the model path).
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # What a request's sampling fields default to (--generation-config).
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    # The engine's configuration as text, the same in every process serving the model (the server's
    # system_fingerprint is a digest of it and of the fields above).
    engine_config: str = ""


class EngineClient(ABC):
    """Async engine as seen by the server. `submit` streams deltas: each yielded RequestOutput holds,
    per completion index that changed, only the new text/token ids/logprobs since the previous yield;
    the last one has finished=True. Cancelling the iterator (client disconnect) aborts the request."""

    model_info: ServedModel
    # Tokenizer with the chat template (the server tokenizes; the engine only sees token ids).
    tokenizer: Tokenizer
    # Checks requests against this engine's model (set once the engine is ready).
    input_processor: InputProcessor

    @abstractmethod
    def submit(
        self, request: ValidatedRequest, request_id: str, group_id: str = ""
    ) -> AsyncGenerator[RequestOutput, None]:
        """Raises QueueFullError or EngineDeadError (before the first yield). `group_id` names the API
        request when it makes several of these (a batch of prompts): the scheduler gives the whole group
        one turn at a time for admission, like a request's n."""

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        group_id: str = "",
    ) -> AsyncIterator[RequestOutput]:
        """`submit` for a request not validated yet; raises RequestRejectedError for one that cannot run."""
        processor: InputProcessor | None = getattr(self, "input_processor", None)
        if processor is None:
            raise EngineDeadError("the engine is still loading")
        request = processor.process(prompt_token_ids, sampling_params, prompt)
        async with contextlib.aclosing(self.submit(request, request_id, group_id)) as stream:
            async for output in stream:
                yield output

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed at the next engine step. Unknown ids are ignored."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @property
    @abstractmethod
    def is_ready(self) -> bool:
        """True once the model is loaded and the engine loop is running."""

    @property
    @abstractmethod
    def is_dead(self) -> bool:
        """True if the engine stopped and cannot serve."""

    @abstractmethod
    async def shutdown(self) -> None: ...

    def most_requests_at_once(self) -> int | None:
        """The most requests this engine holds at once, running and queued (None: no limit). A batch
        of prompts beyond it could never be admitted whole, however long its client waited."""
        return None

    def begin_loading(self) -> None:
        """A head start, called before the server sets itself up: an engine may begin its slow
        loading here, to overlap the server's own start-up; its start() does the rest. By default
        nothing happens here."""
        return None
