"""The interface the HTTP server uses to talk to an engine (PyTorch async engine or the MLX backend)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchlm.outputs import RequestOutput
from batchlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from batchlm.tokenizer.tokenizer import Tokenizer


class EngineDeadError(RuntimeError):
    """The engine stopped (crashed or shut down); no request can be served."""


class RequestRejectedError(ValueError):
    """A request the engine refuses before running it (a client error: HTTP 400).
    `param` names the offending field where there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """Too many requests are waiting (HTTP 429)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics and the periodic log line."""

    num_running: int = 0
    num_waiting: int = 0
    # Fraction of KV-cache blocks in use, 0..1.
    kv_cache_usage: float = 0.0
    # Prefix-cache lookups and hits, in tokens, since start.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    # Cumulative token counters since start.
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    # Speculative decoding: draft tokens verified and accepted since start.
    spec_proposed_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the loaded model."""

    # Name the API reports and accepts in the `model` field.
    served_model_name: str
    # Max prompt + output tokens of one request.
    max_model_len: int
    vocab_size: int
    # Aliases also accepted in the `model` field (e.g. the model path).
    aliases: tuple[str, ...] = field(default_factory=tuple)


class EngineClient(ABC):
    """Async engine as seen by the server. `generate` streams deltas: each yielded RequestOutput holds,
    per completion index that changed, only the new text/token ids/logprobs since the previous yield;
    the last one has finished=True. Cancelling the iterator (client disconnect) aborts the request."""

    model_info: ModelInfo
    # Tokenizer with the chat template (the server tokenizes; the engine only sees token ids).
    tokenizer: Tokenizer

    @abstractmethod
    def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        group_id: str = "",
    ) -> AsyncIterator[RequestOutput]:
        """Raises RequestRejectedError, QueueFullError or EngineDeadError (before the first yield).
        `group_id` names the API request when it makes several of these (a batch of prompts): the
        scheduler gives the whole group one turn at a time for admission, like a request's n."""

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

    def begin_loading(self) -> None:
        """A head start, called before the server sets itself up: an engine may begin its slow
        loading here, to overlap the server's own start-up; its start() does the rest. By default
        nothing happens here."""
        return None
