"""The synchronous MLX generation loop: admits requests into mlx-lm's BatchGenerator and turns its
responses into EngineCoreOutputs. Only the generation thread calls it (mlx streams are per thread)."""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from mlx_lm.generate import BatchGenerator, StopSequences

from batchlm.backends.mlx.float_logits import Float32Logits
from batchlm.backends.mlx.grammar import GrammarProcessor, MLXGrammars, grammar_processors
from batchlm.backends.mlx.logprobs import LogprobsQuery, token_logprobs
from batchlm.backends.mlx.prompt_cache import CacheLookup, PromptCache
from batchlm.backends.mlx.prompt_scores import PromptScores, score_prompt
from batchlm.backends.mlx.sampling import (
    RawLogprobsRecorder,
    SamplerFactory,
    logits_processors,
    stop_sequences,
)
from batchlm.core.admission import AdmissionTickets
from batchlm.core.facts import EngineStats
from batchlm.outputs import EngineCoreOutput, FinishReason, TokenLogprobs
from batchlm.request import EngineCoreRequest
from batchlm.structured.backend import grammar_failure_error
from batchlm.structured.factory import BackendFactory

# How often the running batch's KV byte count (a walk over every layer's cache) is refreshed for stats().
KV_USAGE_REFRESH_S = 0.25
# Prompt tokens a forward of their own scores at once for their logprobs ([rows, vocab] stays bounded).
PROMPT_SCORE_ROWS = 256


@dataclass(frozen=True)
class LoopSettings:
    """How the loop drives the BatchGenerator."""

    # Max sequences in the generator at once (the seed's --batch-size).
    max_num_seqs: int
    # Prompt tokens per prefill chunk (per sequence).
    prefill_step_size: int
    # Prompts prefilled side by side.
    prefill_batch_size: int
    # Bytes the running batch's KV and the prompt cache may use together.
    kv_budget_bytes: int
    # Reuse the KV of finished sequences for new prompts that share a prefix.
    enable_prefix_caching: bool = True


@dataclass
class _Running:
    """A sequence inside the BatchGenerator."""

    request: EngineCoreRequest
    uid: int
    num_cached_tokens: int
    scheduled_time: float
    recorder: RawLogprobsRecorder | None = None
    # The grammar's processor of a constrained request.
    grammar: GrammarProcessor | None = None
    reported: bool = False
    # SamplingParams.prompt_logprobs: the prompt's, sent with the first output.
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()


class GenerationLoop:
    """Admission up to max_num_seqs, in the torch scheduler's turns (first come, first served, but a
    request's n sequences share one turn: core/admission.py); every step runs one decode for the whole
    batch plus one prefill chunk for the prompts being processed, so requests join and leave at every
    step."""

    def __init__(
        self,
        model: Any,
        vocab_size: int,
        settings: LoopSettings,
        model_key: Any,
        stream: Any = None,
        grammar_backend: BackendFactory | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        """grammar_backend: builds the grammar backend for structured outputs (None: refused); wake:
        called on another thread once a grammar compiled ahead is ready (or failed), for a caller
        that waits for commands while requests only wait for their grammar (can_step False)."""
        self.model = Float32Logits(model)
        self._grammars = MLXGrammars(grammar_backend, wake) if grammar_backend is not None else None
        # Waiting requests whose grammar is being compiled: the others are admitted past them.
        self._compiling: set[str] = set()
        self.settings = settings
        self._stream = stream
        self._samplers = SamplerFactory(vocab_size)
        # Shared by the running requests with the same stop tokens only: the client picks them.
        self._stop_automata: weakref.WeakValueDictionary[Any, StopSequences] = weakref.WeakValueDictionary()
        self.prompt_cache = PromptCache(model_key, settings.kv_budget_bytes, settings.enable_prefix_caching)
        self.prompt_scores = PromptScores(settings.enable_prefix_caching)
        self._waiting: OrderedDict[str, EngineCoreRequest] = OrderedDict()
        self._tickets = AdmissionTickets()
        self._running: dict[int, _Running] = {}
        self._uid_of: dict[str, int] = {}
        self._kv_usage = 0.0
        self._kv_usage_time = 0.0
        # Prompt tokens of the admitted sequences: each of a request's n completions prefills its prompt.
        self._prompt_tokens_total = 0
        self._generator = self._new_generator()

    def _new_generator(self) -> BatchGenerator:
        settings = self.settings
        return BatchGenerator(
            self.model,
            completion_batch_size=settings.max_num_seqs,
            prefill_batch_size=min(settings.prefill_batch_size, settings.max_num_seqs),
            prefill_step_size=settings.prefill_step_size,
            stream=self._stream,
        )

    # -- requests ------------------------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        if request.request_id in self._waiting or request.request_id in self._uid_of:
            raise ValueError(f"request id {request.request_id!r} is already running")
        self._waiting[request.request_id] = request
        self._tickets.add(request)
        if self._grammars is None or request.sampling_params.structured_outputs is None:
            return
        if not self._grammars.compiles.start(request):  # not compiled before: it waits for it
            self._compiling.add(request.request_id)

    def abort_requests(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """Drop the requests (waiting or running); each known one gets a final ABORT output."""
        outputs, uids = [], []
        request_ids = list(request_ids)
        if self._grammars is not None:
            self._grammars.compiles.discard(request_ids)
        self._compiling.difference_update(request_ids)
        for request_id in request_ids:
            if (waiting := self._waiting.pop(request_id, None)) is not None:
                self._tickets.finished(waiting)
                outputs.append(EngineCoreOutput(request_id, (), finish_reason=FinishReason.ABORT))
            elif (uid := self._uid_of.pop(request_id, None)) is not None:
                self._tickets.finished(self._running.pop(uid).request)
                uids.append(uid)
                outputs.append(EngineCoreOutput(request_id, (), finish_reason=FinishReason.ABORT))
        if uids:
            self._generator.remove(uids)
        return outputs

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def can_step(self) -> bool:
        """has_work, less requests that only wait for their grammar: a step now would make progress
        rather than wait for a compile."""
        return (
            bool(self._running)
            or len(self._waiting) > len(self._compiling)
            or (self._grammars is not None and self._grammars.compiles.has_done())
        )

    def fail_running(self, message: str) -> list[EngineCoreOutput]:
        """After the generator raised: end every admitted sequence with ERROR and start a fresh generator
        (waiting requests are untouched and run next)."""
        outputs = [
            EngineCoreOutput(r.request.request_id, (), finish_reason=FinishReason.ERROR, error=message)
            for r in self._running.values()
        ]
        for running in self._running.values():
            self._tickets.finished(running.request)
        self._running.clear()
        self._uid_of.clear()
        self._generator.close()
        self._generator = self._new_generator()
        return outputs

    def close(self) -> None:
        if self._grammars is not None:
            self._grammars.compiles.close()
        self._generator.close()

    # -- stepping ------------------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        """Admit what fits, run one generator step, and report the tokens it produced. Raises what the
        generator raises (the caller then calls fail_running). With nothing else to do but requests
        waiting for their grammar, it first waits for one to be compiled."""
        outputs = self._take_grammars()
        outputs += self._admit()
        if not self._running:
            return outputs
        _, generated = self._generator.next()
        return outputs + self._to_outputs(generated)

    def _take_grammars(self) -> list[EngineCoreOutput]:
        """Let the requests whose grammar is ready be admitted; ERROR outputs for those whose grammar
        failed to compile."""
        if self._grammars is None or not self._compiling:
            return []
        compiles = self._grammars.compiles
        if not self.can_step():
            compiles.wait_done()
        failed = []
        for request_id, error in compiles.take_done().items():
            self._compiling.discard(request_id)
            if error is not None and (waiting := self._waiting.pop(request_id, None)) is not None:
                self._tickets.finished(waiting)
                failed.append(EngineCoreOutput(request_id, (), finish_reason=FinishReason.ERROR, error=error))
        return failed

    def _admit(self) -> list[EngineCoreOutput]:
        """Move waiting requests into the generator, in order but past those whose grammar is being
        compiled; ERROR outputs for any it refused to take."""
        room = self.settings.max_num_seqs - len(self._running)
        admitted = []
        while room > 0 and (request := self._next_in_line()) is not None:
            del self._waiting[request.request_id]
            self._tickets.admitted(request)
            admitted.append(request)
            room -= 1
        if not admitted:
            return []
        grammars, failed = grammar_processors(self._grammars, admitted)
        startable = [r for r in admitted if r.request_id in grammars]
        try:
            if startable:
                self._insert(startable, grammars)
        except Exception as exc:  # e.g. a processor mlx cannot build: fail these requests, not the loop
            message = f"the mlx backend could not start the request: {type(exc).__name__}: {exc}"
            failed += [
                EngineCoreOutput(r.request_id, (), finish_reason=FinishReason.ERROR, error=message)
                for r in startable
                if r.request_id not in self._uid_of
            ]
        for request in admitted:
            if request.request_id not in self._uid_of:  # failed to start: its turn ends here
                self._tickets.finished(request)
        return failed

    def _next_in_line(self) -> EngineCoreRequest | None:
        """The waiting request whose turn it is, past those whose grammar is being compiled."""
        candidates = (r for r in self._waiting.values() if r.request_id not in self._compiling)
        if not self._tickets.num_groups:
            return next(candidates, None)  # no n > 1 request: first come, first served
        return min(candidates, key=self._tickets.ticket, default=None)

    def _insert(self, requests: list[EngineCoreRequest], grammars: dict[str, list[GrammarProcessor]]) -> None:
        # Scheduled now: a prompt's scoring forward below is its prefill, not time it waited.
        now = time.time()
        # A prompt whose logprobs were asked is scored first; the generator goes on from that forward's
        # cache, so the prompt runs once (its last token, which gives the first output, in the generator).
        scores: dict[str, tuple[TokenLogprobs, ...]] = {}
        lookups, num_cached = [], []
        for request in requests:
            prompt, num_top = request.prompt_token_ids, request.sampling_params.prompt_logprobs
            if num_top is None or len(prompt) < 2:
                lookups.append(self.prompt_cache.lookup(prompt))
                num_cached.append(lookups[-1].num_cached)
                continue
            # Reused KV stands in for rows whose logprobs it reports: only as far as those are kept.
            kept = self.prompt_scores.covered(prompt, num_top)
            reused = self.prompt_cache.lookup(prompt, max_cached=len(kept))
            scored, cache = score_prompt(
                self.model, request, reused, kept[: reused.num_cached], PROMPT_SCORE_ROWS
            )
            self.prompt_scores.keep(prompt, num_top, scored)
            scores[request.request_id] = scored
            lookups.append(CacheLookup(cache, len(prompt) - 1))
            num_cached.append(reused.num_cached)
        # None asks the generator for a fresh cache.
        caches: list[Any] = [lookup.cache for lookup in lookups]
        recorders: list[RawLogprobsRecorder | None] = []
        processor_lists: list[list[Any]] = []
        for request in requests:
            params = request.sampling_params
            processors = logits_processors(params, len(request.prompt_token_ids), request.eos_token_ids)
            grammar = grammars[request.request_id]
            # After the grammar mask: logprobs come from the distribution the grammar allows.
            recorder = RawLogprobsRecorder() if processors and params.logprobs is not None else None
            recorders.append(recorder)
            processor_lists.append([*grammar, *([recorder] if recorder else []), *processors])
        uids = self._generator.insert_segments(
            segments=[
                [list(r.prompt_token_ids[lk.num_cached :])] for r, lk in zip(requests, lookups, strict=True)
            ],
            max_tokens=[self._max_tokens(r) for r in requests],
            caches=caches,
            all_tokens=[
                list(r.prompt_token_ids[: lk.num_cached]) for r, lk in zip(requests, lookups, strict=True)
            ],
            samplers=[self._samplers.sampler_for(r.sampling_params, r.seed) for r in requests],
            logits_processors=processor_lists,
            stop_sequences=[
                stop_sequences(r.sampling_params, r.eos_token_ids, self._stop_automata) for r in requests
            ],
        )
        for request, cached, recorder, uid in zip(requests, num_cached, recorders, uids, strict=True):
            processor = next(iter(grammars[request.request_id]), None)  # at most one
            running = _Running(request, uid, cached, now, recorder, processor)
            running.prompt_logprobs = scores.get(request.request_id, ())
            self._running[uid] = running
            self._uid_of[request.request_id] = uid
            self._prompt_tokens_total += len(request.prompt_token_ids)

    @staticmethod
    def _max_tokens(request: EngineCoreRequest) -> int:
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            raise ValueError(
                f"request {request.request_id!r} reached the engine without a resolved max_tokens"
            )
        return max_tokens

    def _to_outputs(self, generated: list[Any]) -> list[EngineCoreOutput]:
        logprobs = self._logprobs(generated)
        outputs = []
        for response in generated:
            running = self._running[response.uid]
            failure = running.grammar.failure if running.grammar is not None else None
            if failure is not None:
                outputs.append(self._grammar_failed(running, response, failure))
                continue
            outputs.append(self._output(running, response, logprobs.get(response.uid)))
            if response.finish_reason is not None:
                self._finish(running, response)
        return outputs

    def _grammar_failed(self, running: _Running, response: Any, failure: str) -> EngineCoreOutput:
        """End a sequence whose grammar failed (its last token is only the EOS its mask forced) with an
        error that says why, as the torch engine does."""
        if response.finish_reason is None:
            self._generator.remove([response.uid])
        self._finish(running, response)
        return replace(
            self._output(running, response, None),
            new_token_ids=(),
            finish_reason=FinishReason.ERROR,
            stop_token_id=None,
            error=grammar_failure_error(failure),
        )

    def _logprobs(self, generated: list[Any]) -> dict[int, TokenLogprobs]:
        """Logprobs for the sequences that asked, in one evaluation."""
        queries, uids = [], []
        for response in generated:
            running = self._running[response.uid]
            num_top = running.request.sampling_params.logprobs
            if num_top is None:
                continue
            vector = running.recorder.pop() if running.recorder else response.logprobs
            queries.append(LogprobsQuery(vector, response.token, num_top))
            uids.append(response.uid)
        return dict(zip(uids, token_logprobs(queries), strict=True))

    def _output(self, running: _Running, response: Any, logprobs: TokenLogprobs | None) -> EngineCoreOutput:
        finish = None if response.finish_reason is None else FinishReason(response.finish_reason)
        params = running.request.sampling_params
        stop_token_id = (
            response.token
            if finish is FinishReason.STOP and response.token in params.stop_token_ids
            else None
        )
        first = not running.reported
        running.reported = True
        return EngineCoreOutput(
            request_id=running.request.request_id,
            new_token_ids=(response.token,),
            new_logprobs=() if logprobs is None else (logprobs,),
            finish_reason=finish,
            stop_token_id=stop_token_id,
            num_cached_tokens=running.num_cached_tokens,
            scheduled_time=running.scheduled_time if first else None,
            prompt_logprobs=running.prompt_logprobs if first else (),
        )

    def _finish(self, running: _Running, response: Any) -> None:
        self._tickets.finished(running.request)
        self._running.pop(running.uid)
        self._uid_of.pop(running.request.request_id, None)
        if response.prompt_cache is not None and response.all_tokens is not None:
            self.prompt_cache.store(
                response.all_tokens, response.prompt_cache, self._generator.prompt_cache_nbytes
            )

    # -- stats ---------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        # Only the running sequences' KV is in use: the prompt cache's entries are evictable, so they count
        # as free (as the torch scheduler's cached blocks do), and an idle loop reports 0 at once.
        now = time.monotonic()
        if not self._running:
            self._kv_usage, self._kv_usage_time = 0.0, 0.0
        elif now - self._kv_usage_time >= KV_USAGE_REFRESH_S:
            used = self._generator.prompt_cache_nbytes
            self._kv_usage = min(1.0, used / max(1, self.settings.kv_budget_bytes))
            self._kv_usage_time = now
        return EngineStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            kv_cache_usage=self._kv_usage,
            prefix_cache_queries=self.prompt_cache.queries,
            prefix_cache_hits=self.prompt_cache.hits,
            prompt_tokens_total=self._prompt_tokens_total,
        )
