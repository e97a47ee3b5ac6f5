"""A deterministic fake EngineClient for server tests (on fake_tokenizer.py's byte-level tokenizer by
default): scripted replies, stop strings, logprobs, controllable delays, a queue limit and a "die"
switch. Run as a script it serves itself through the real launcher (signals included):
`python tests/fake_engine.py --port 8123`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from batchlm.core.facts import ModelFacts
from batchlm.engine.client import (
    EngineClient,
    EngineDeadError,
    EngineStats,
    QueueFullError,
    RequestRejectedError,
    ServedModel,
)
from batchlm.engine.input_processor import InputProcessor, ValidatedRequest
from batchlm.outputs import CompletionOutput, FinishReason, RequestMetrics, RequestOutput, TokenLogprobs
from batchlm.sampling_params import SamplingParams
from fake_tokenizer import FakeTokenizer


@dataclass
class FakeCall:
    """One generate() call as the engine received it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    group_id: str = ""


@dataclass
class _Choice:
    index: int
    reply_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None


class FakeEngine(EngineClient):
    """Each completion spells out `reply` (completion i > 0: f"{i}:" + reply), one token of it per step,
    then stops ("stop") unless ignore_eos; max_tokens and stop strings are honoured like the real front end.
    Works with any tokenizer: FakeTokenizer (one token per byte) by default, or the real Tokenizer."""

    def __init__(
        self,
        *,
        tokenizer: Any = None,
        reply: str = "Hello from the fake engine.",
        max_model_len: int = 512,
        token_delay_s: float = 0.0,
        first_token_delay_s: float = 0.0,
        load_delay_s: float = 0.0,
        ready: bool = True,
        max_in_flight: int | None = None,
        cached_tokens: int = 0,
        served_model_name: str = "fake-model",
        abort_raises_cancelled: bool = False,
    ) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else FakeTokenizer()
        facts = ModelFacts(max_model_len, self.tokenizer.vocab_size)
        self.model_info = ServedModel(served_model_name, facts, ("/models/fake",))
        chars_per_token = getattr(self.tokenizer, "max_chars_per_token", None)
        self.input_processor = InputProcessor(facts, chars_per_token)
        self.reply = reply
        self.token_delay_s = token_delay_s
        self.first_token_delay_s = first_token_delay_s
        self.load_delay_s = load_delay_s
        self.max_in_flight = max_in_flight
        self.cached_tokens = cached_tokens
        self.abort_raises_cancelled = abort_raises_cancelled
        self.calls: list[FakeCall] = []
        self.aborted: list[str] = []
        # Raised from the next step of every request (simulates an engine bug).
        self.unexpected_error: Exception | None = None
        # start() waits for this event when set (tests hold the engine in "loading"), then raises
        # start_error if that is set.
        self.load_gate: threading.Event | None = None
        self.start_error: Exception | None = None
        # When set, every request is refused with RequestRejectedError(reject_message, "prompt").
        self.reject_message: str | None = None
        self.shut_down = False
        self._ready = ready
        self._dead = False
        self._active: set[str] = set()
        self._abort_requested: set[str] = set()
        self._prompt_tokens = 0
        self._generated_tokens = 0

    # -- controls ----------------------------------------------------------------------------------

    def kill(self) -> None:
        """The engine process 'dies': in-flight streams raise EngineDeadError at their next step."""
        self._dead = True

    async def start(self) -> None:
        await asyncio.sleep(self.load_delay_s)
        while self.load_gate is not None and not self.load_gate.is_set():
            await asyncio.sleep(0.01)
        if self.start_error is not None:
            raise self.start_error
        self._ready = True

    @property
    def running(self) -> int:
        """Requests whose generate() stream is open."""
        return len(self._active)

    # -- EngineClient ------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._ready and not self._dead

    @property
    def is_dead(self) -> bool:
        return self._dead

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self._active),
            kv_cache_usage=0.125 * len(self._active),
            prefix_cache_queries=self._prompt_tokens,
            prefix_cache_hits=min(self.cached_tokens * len(self.calls), self._prompt_tokens),
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generated_tokens,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._abort_requested.add(request_id)

    async def shutdown(self) -> None:
        self.shut_down = True
        self._dead = True

    def submit(
        self, request: ValidatedRequest, request_id: str, group_id: str = ""
    ) -> AsyncGenerator[RequestOutput, None]:
        call = FakeCall(request_id, list(request.prompt_token_ids), request.params, request.prompt, group_id)
        return self._generate(call)

    async def _generate(self, call: FakeCall) -> AsyncGenerator[RequestOutput, None]:
        self._admit(call)
        params = call.params
        replies = [self.reply if i == 0 else f"{i}:{self.reply}" for i in range(params.n)]
        choices = [
            _Choice(i, self.tokenizer.encode(r, add_special_tokens=False)) for i, r in enumerate(replies)
        ]
        timing = RequestMetrics(arrival_time=time.time(), first_scheduled_time=time.time())
        self._active.add(call.request_id)
        try:
            step = 0
            while any(c.finish_reason is None for c in choices):
                await asyncio.sleep(self.first_token_delay_s if step == 0 else self.token_delay_s)
                if self._dead:
                    raise EngineDeadError("the fake engine died")
                if self.unexpected_error is not None:
                    raise self.unexpected_error
                if call.request_id in self._abort_requested:
                    if self.abort_raises_cancelled:
                        raise asyncio.CancelledError()
                    yield self._aborted_output(call, choices, timing)
                    return
                yield self._step(call, choices, timing, step)
                step += 1
        finally:
            self._active.discard(call.request_id)

    def _admit(self, call: FakeCall) -> None:
        self.calls.append(call)
        if self._dead:
            raise EngineDeadError("the fake engine is dead")
        if not self._ready:
            raise EngineDeadError("the fake engine is still loading")
        if self.max_in_flight is not None and len(self._active) >= self.max_in_flight:
            raise QueueFullError(f"{len(self._active)} requests are already running")
        if self.reject_message is not None:
            raise RequestRejectedError(self.reject_message, "prompt")
        self._prompt_tokens += len(call.prompt_token_ids)

    def _step(
        self, call: FakeCall, choices: list[_Choice], timing: RequestMetrics, step: int
    ) -> RequestOutput:
        now = time.time()
        timing.first_token_time = timing.first_token_time or now
        timing.last_token_time = now
        deltas = [
            self._advance(choice, call.params, step) for choice in choices if choice.finish_reason is None
        ]
        finished = all(c.finish_reason is not None for c in choices)
        if finished:
            timing.finished_time = now
        return RequestOutput(
            call.request_id, call.prompt, call.prompt_token_ids, deltas, finished, self.cached_tokens, timing
        )

    def _advance(self, choice: _Choice, params: SamplingParams, step: int) -> CompletionOutput:
        """Generate one token for `choice` and return the delta (text held back while a stop may match)."""
        token = choice.reply_ids[len(choice.tokens) % len(choice.reply_ids)]
        choice.tokens.append(token)
        self._generated_tokens += 1
        text = self.tokenizer.decode(choice.tokens, skip_special_tokens=params.skip_special_tokens)
        if len(choice.tokens) >= len(choice.reply_ids) and not params.ignore_eos:
            choice.finish_reason = FinishReason.STOP
        if params.max_tokens is not None and len(choice.tokens) >= params.max_tokens:
            choice.finish_reason = choice.finish_reason or FinishReason.LENGTH
        text, visible = self._apply_stops(choice, text, params)
        if choice.finish_reason is None and text.endswith("\ufffd"):
            visible = min(visible, len(text) - 1)  # an incomplete UTF-8 character: wait for its other bytes
        delta = text[choice.emitted : visible]
        choice.emitted = max(choice.emitted, visible)
        logprobs = None
        if params.logprobs is not None:
            top = tuple(
                ((token + k) % self.model_info.facts.vocab_size, -0.25 - k) for k in range(params.logprobs)
            )
            logprobs = [TokenLogprobs(logprob=-0.25 - 0.01 * step, rank=1, top=top)]
        return CompletionOutput(
            choice.index, delta, [token], None, logprobs, choice.finish_reason, choice.stop_reason
        )

    @staticmethod
    def _apply_stops(choice: _Choice, text: str, params: SamplingParams) -> tuple[str, int]:
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:
                choice.finish_reason, choice.stop_reason = FinishReason.STOP, stop
                text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
                return text, len(text)
        if choice.finish_reason is not None or not params.stop:
            return text, len(text)
        # Hold back a tail that could still become a stop string.
        return text, max(0, len(text) - (max(len(s) for s in params.stop) - 1))

    def _aborted_output(
        self, call: FakeCall, choices: list[_Choice], timing: RequestMetrics
    ) -> RequestOutput:
        timing.finished_time = time.time()
        deltas = [
            CompletionOutput(c.index, "", [], finish_reason=FinishReason.ABORT)
            for c in choices
            if c.finish_reason is None
        ]
        return RequestOutput(call.request_id, call.prompt, call.prompt_token_ids, deltas, True, 0, timing)


# -- test helpers -----------------------------------------------------------------------------------


def openai_client(base_url: str, api_key: str = "unused") -> Any:
    """The official client, without retries (a retried 429 or 503 would hide the status under test).
    Its timeout is a hang guard: a 100-token reply of the tiny model's engine took up to 58 s on a loaded
    2-core machine."""
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=300)


def free_port() -> int:
    """A local TCP port nothing listens on (for a server started in another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Any, timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll `predicate` until true; fail after a generous timeout (a hang guard, not a timing check: CI's
    loaded 2-core machine can be ten times slower than an idle one)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def metric_value(metrics_text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in Prometheus text, e.g. metric_value(t, "batchlm_requests_total", 'outcome="stop"')."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in metrics_text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return None


def main(argv: list[str] | None = None) -> int:
    """Serve a FakeEngine with the production launcher (SIGINT/SIGTERM drain included)."""
    from batchlm.logging_setup import configure_logging
    from batchlm.server.app import build_app
    from batchlm.server.launcher import run_server
    from batchlm.server.state import ServerSettings

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    configure_logging("INFO")
    engine = FakeEngine(token_delay_s=args.token_delay, load_delay_s=args.load_delay, ready=False)
    if hasattr(signal, "SIGUSR1"):
        # A test's slow stream outlasts its checks however long a loaded machine makes them, then
        # ends at once: SIGUSR1 drops the delay between tokens.
        signal.signal(signal.SIGUSR1, lambda *_: setattr(engine, "token_delay_s", 0.0))
    settings = ServerSettings(port=args.port, shutdown_timeout_s=args.shutdown_timeout)
    return run_server(build_app(engine, settings), engine, start_engine=engine.start)


if __name__ == "__main__":
    sys.exit(main())
