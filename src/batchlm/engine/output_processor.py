"""Front-end output processing: fan a request out into its engine-core sequences, then detokenize,
apply stop strings, and fan the n completions back into one request."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from batchlm.engine.input_processor import ValidatedRequest
from batchlm.outputs import (
    CompletionOutput,
    CoreOutputs,
    EngineCoreOutput,
    FinishReason,
    RequestMetrics,
    RequestOutput,
    TokenLogprobs,
)
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams
from batchlm.tokenizer.detokenizer import IncrementalDetokenizer
from batchlm.tokenizer.tokenizer import Tokenizer


def child_request_ids(request_id: str, n: int) -> list[str]:
    """Engine-core ids of a request's n sequences."""
    return [request_id] if n == 1 else [f"{request_id}:{i}" for i in range(n)]


def make_core_requests(
    request_id: str,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    eos_token_ids: tuple[int, ...],
    arrival_time: float,
    group_id: str = "",
    final_output_only: bool = False,
) -> list[EngineCoreRequest]:
    """One engine-core request per completion; seeded children get distinct, reproducible seeds. The
    children share an admission group: `group_id` when given, else the request (when n > 1)."""
    prompt = tuple(prompt_token_ids)
    return [
        EngineCoreRequest(
            request_id=core_id,
            prompt_token_ids=prompt,
            sampling_params=params,
            eos_token_ids=eos_token_ids,
            arrival_time=arrival_time,
            seed=None if params.seed is None else params.seed + index,
            group_id=group_id or (request_id if params.n > 1 else ""),
            final_output_only=final_output_only,
        )
        for index, core_id in enumerate(child_request_ids(request_id, params.n))
    ]


@dataclass
class _Completion:
    """One sequence's output not yet reported: since the last delta, or all of it when the caller
    asks for cumulative outputs (then nothing is ever cleared)."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    # None unless the request asked for logprobs.
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # Anything new since the last delta.
    changed: bool = False


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None
    # With SamplingParams.prompt_logprobs, once the first output brought them (None for the first token).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # A delta carried them already.
    prompt_logprobs_reported: bool = False

    @property
    def finished(self) -> bool:
        # Read several times per request per step: a plain loop is cheaper than all(<genexpr>).
        for completion in self.completions:  # noqa: SIM110
            if completion.finish_reason is None:
                return False
        return True


class OutputProcessor:
    """Turns EngineCoreOutputs into RequestOutputs. Not thread-safe: one owner calls it."""

    def __init__(self, tokenizer: Tokenizer, text_when_finished: bool = False) -> None:
        """text_when_finished: the caller reads cumulative outputs of finished requests only
        (process(delta=False, finished_only=True), as offline generation does), so a sequence without
        stop strings is detokenized once, when it finishes, instead of token by token each step: the
        same text (IncrementalDetokenizer's invariant), without per-token work on the step loop."""
        self.tokenizer = tokenizer
        self._text_when_finished = text_when_finished
        self._requests: dict[str, _RequestState] = {}
        # Engine-core sequence id -> (request id, completion index).
        self._sequences: dict[str, tuple[str, int]] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> list[str]:
        """Register a request; returns the engine-core ids of its sequences."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        completions = []
        for index in range(params.n):
            detokenizer = None
            if params.detokenize:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_tokens,
                )
            completions.append(
                _Completion(index, detokenizer, logprobs=[] if params.logprobs is not None else None)
            )
        self._requests[request_id] = _RequestState(
            request_id, prompt, list(prompt_token_ids), params, completions, RequestMetrics(arrival_time)
        )
        ids = child_request_ids(request_id, params.n)
        for index, core_id in enumerate(ids):
            self._sequences[core_id] = (request_id, index)
        return ids

    def add_validated(
        self, request_id: str, request: ValidatedRequest, eos_token_ids: tuple[int, ...], group_id: str = ""
    ) -> list[EngineCoreRequest]:
        """Register a validated request; returns the engine-core requests to send for it."""
        now = time.time()
        self.add_request(request_id, request.prompt, request.prompt_token_ids, request.params, now)
        ids, params = request.prompt_token_ids, request.params
        # Read only at the finish, a sequence whose text needs no stop-string search and that asks no
        # logprobs is reported once, by the core, when it finishes.
        read_at_finish = self._text_when_finished or params.final_output_only
        final_only = read_at_finish and not params.stop and params.logprobs is None
        final_only = final_only and params.prompt_logprobs is None
        return make_core_requests(request_id, ids, params, eos_token_ids, now, group_id, final_only)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def core_ids_of(self, request_id: str) -> list[str]:
        state = self._requests.get(request_id)
        if state is None:
            return []
        return child_request_ids(request_id, len(state.completions))

    def process(
        self, outputs: Iterable[EngineCoreOutput], delta: bool, finished_only: bool = False
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs of requests that changed (with finished_only, of those that
        finished: offline use, where building a cumulative output every step would cost O(n^2)), and
        engine-core ids to abort (their sequences hit a stop string, which only the front end sees).
        A delta holds what is new since the last one; without `delta` outputs are cumulative."""
        assert not self._text_when_finished or (finished_only and not delta), "texts are made at the finish"
        changed: dict[str, _RequestState] = {}
        to_abort: list[str] = []
        now = time.time()
        if isinstance(outputs, CoreOutputs):
            self._fold_columns(outputs, now, changed, to_abort)
        else:
            for output in outputs:
                located = self._sequences.get(output.request_id)
                if located is None:
                    continue
                state = self._requests[located[0]]
                completion = state.completions[located[1]]
                if completion.finish_reason is not None:
                    continue
                if self._apply(state, completion, output, now):
                    to_abort.append(output.request_id)
                changed[state.request_id] = state
        results = [
            self._make_output(state, delta)
            for state in changed.values()
            if state.finished or not finished_only
        ]
        for state in changed.values():
            if state.finished:
                self._forget(state)
        return results, to_abort

    def abort_request(self, request_id: str) -> None:
        """Forget a request (the caller aborts its sequences in the core); unknown ids are ignored."""
        state = self._requests.get(request_id)
        if state is not None:
            self._forget(state)

    def _fold_columns(
        self, outputs: CoreOutputs, now: float, changed: dict[str, _RequestState], to_abort: list[str]
    ) -> None:
        """process()'s loop over outputs in columns: most are new tokens alone, folded in without
        an EngineCoreOutput each (that object and its unpacking were a fifth of their cost)."""
        whole = outputs.whole
        sequences, requests = self._sequences, self._requests
        for index, (core_id, token_ids) in enumerate(
            zip(outputs.request_ids, outputs.token_ids, strict=True)
        ):
            located = sequences.get(core_id)
            if located is None:
                continue
            state = requests[located[0]]
            completion = state.completions[located[1]]
            if completion.finish_reason is not None:
                continue
            output = whole.get(index) if whole else None
            if output is None:
                stopped = self._apply_tokens(state, completion, token_ids, now)
            else:
                stopped = self._apply(state, completion, output, now)
            if stopped:
                to_abort.append(core_id)
            changed[state.request_id] = state

    def _apply_tokens(
        self, state: _RequestState, completion: _Completion, new_token_ids: tuple[int, ...], now: float
    ) -> bool:
        """_apply for an output of new token ids and nothing else (no finish, logprobs, cached tokens
        or times): the same changes, without the checks that such an output always passes."""
        metrics = state.metrics
        if new_token_ids:
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            if state.prompt_logprobs is None and state.params.prompt_logprobs is not None:
                state.prompt_logprobs = [None]
        completion.changed = True
        completion.token_ids.extend(new_token_ids)
        detokenizer = completion.detokenizer
        if detokenizer is None or (self._text_when_finished and not state.params.stop):
            return False  # no text, or the text is made when the sequence finishes
        if new_token_ids:
            added = detokenizer.update(new_token_ids)
            if added:
                completion.text += added
        if detokenizer.stop_reason is None:
            return False
        completion.finish_reason = FinishReason.STOP
        completion.stop_reason = detokenizer.stop_reason
        if metrics.finished_time is None and state.finished:
            metrics.finished_time = now
        return True

    def _apply(
        self, state: _RequestState, completion: _Completion, output: EngineCoreOutput, now: float
    ) -> bool:
        """Fold one engine-core output into its completion; True if a stop string ended it early."""
        metrics = state.metrics
        new_token_ids, new_logprobs = output.new_token_ids, output.new_logprobs
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = output.scheduled_time
        if new_token_ids:
            if metrics.first_token_time is None:
                metrics.first_token_time = output.first_token_time or now
            metrics.last_token_time = now
        state.num_cached_tokens = max(state.num_cached_tokens, output.num_cached_tokens)
        if state.prompt_logprobs is None and state.params.prompt_logprobs is not None and new_token_ids:
            # Every sequence of the request brings the same: the first to come is kept.
            state.prompt_logprobs = [None, *output.prompt_logprobs]
        completion.changed = True
        completion.token_ids.extend(new_token_ids)
        if completion.logprobs is not None and new_logprobs:
            completion.logprobs.extend(new_logprobs)
            total = sum(lp.logprob for lp in new_logprobs)
            completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + total
        stopped_by_string = False
        # Text added by this call: a sequence's several outputs of one batch may come one call each.
        added = ""
        if completion.detokenizer is not None:
            # A stop token (EOS or stop_token_ids) ends the text without appearing in it unless
            # include_stop_str_in_output (it stays in token_ids). Stop strings are ours to find.
            shown: Sequence[int] = new_token_ids
            if self._text_when_finished and not state.params.stop:
                shown = completion.token_ids if output.finished else ()  # every token, once
            if output.finish_reason is FinishReason.STOP and not state.params.include_stop_str_in_output:
                shown = shown[:-1]
            if shown:
                added += completion.detokenizer.update(shown)
            if completion.detokenizer.stop_reason is not None:
                completion.finish_reason = FinishReason.STOP
                completion.stop_reason = completion.detokenizer.stop_reason
                stopped_by_string = not output.finished
        if output.finished and completion.finish_reason is None:
            completion.finish_reason = output.finish_reason or FinishReason.STOP
            completion.stop_reason = output.stop_token_id
            if completion.detokenizer is not None:
                added += completion.detokenizer.finish()
                ended_normally = completion.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
                if completion.detokenizer.stop_reason is not None and ended_normally:
                    # The held-back tail (a character left incomplete) completed a stop string.
                    completion.finish_reason = FinishReason.STOP
                    completion.stop_reason = completion.detokenizer.stop_reason
            if output.error:
                state.error = output.error
        completion.text += added
        if completion.finish_reason is not None and metrics.finished_time is None and state.finished:
            metrics.finished_time = now
        return stopped_by_string

    def _make_output(self, state: _RequestState, delta: bool) -> RequestOutput:
        completions = [_report(c, delta) for c in state.completions if c.changed or not delta]
        prompt_logprobs = None
        if state.prompt_logprobs is not None and not (delta and state.prompt_logprobs_reported):
            prompt_logprobs, state.prompt_logprobs_reported = state.prompt_logprobs, True
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=state.finished,
            num_cached_tokens=state.num_cached_tokens,
            metrics=state.metrics,
            error=state.error,
            prompt_logprobs=prompt_logprobs,
        )

    def _forget(self, state: _RequestState) -> None:
        self._requests.pop(state.request_id, None)
        for core_id in child_request_ids(state.request_id, len(state.completions)):
            self._sequences.pop(core_id, None)


def _report(completion: _Completion, delta: bool) -> CompletionOutput:
    """The completion's unreported output. A delta hands its lists over and starts fresh ones; a
    cumulative output copies them."""
    logprobs = completion.logprobs
    output = CompletionOutput(
        index=completion.index,
        text=completion.text,
        token_ids=completion.token_ids if delta else list(completion.token_ids),
        cumulative_logprob=completion.cumulative_logprob,
        logprobs=logprobs if delta or logprobs is None else list(logprobs),
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )
    if delta:
        completion.text, completion.token_ids, completion.changed = "", [], False
        completion.logprobs = None if logprobs is None else []
    return output
