"""Validate a user request against the model's limits and fan it out into engine-core requests."""

from __future__ import annotations

from collections.abc import Sequence

from batchlm.engine.client import RequestRejectedError
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams


def child_request_ids(request_id: str, n: int) -> list[str]:
    """Engine-core ids of a request's n sequences."""
    return [request_id] if n == 1 else [f"{request_id}:{i}" for i in range(n)]


def validate_request(
    prompt_token_ids: Sequence[int], params: SamplingParams, max_model_len: int, vocab_size: int
) -> SamplingParams:
    """Raise RequestRejectedError for what can never run; return params with max_tokens resolved."""
    if not prompt_token_ids:
        raise RequestRejectedError("the prompt is empty: at least one token is needed", "prompt")
    prompt_len = len(prompt_token_ids)
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestRejectedError(f"prompt token id {bad} is out of range [0, {vocab_size})", "prompt")
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias))):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RequestRejectedError(f"{name} token id {bad} is out of range [0, {vocab_size})", name)
    if params.structured_outputs is not None:
        check_structured_outputs(params)
    if prompt_len >= max_model_len:
        raise RequestRejectedError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, leaving no room for a completion. Please shorten the prompt.",
            "messages",
        )
    room = max_model_len - prompt_len
    if params.max_tokens is None:
        return params.clone(max_tokens=room, min_tokens=min(params.min_tokens, room))
    if params.max_tokens > room:
        raise RequestRejectedError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the prompt, {params.max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens.",
            "max_tokens",
        )
    return params


def check_structured_outputs(params: SamplingParams) -> None:
    """A constraint must compile (its error names the problem), and leave EOS allowed when it is done."""
    from batchlm.structured.backend import GrammarError
    from batchlm.structured.llguidance_backend import validated_grammar

    assert params.structured_outputs is not None
    if params.min_tokens:
        raise RequestRejectedError(
            "min_tokens cannot be combined with structured outputs (a complete output must be able to end)",
            "min_tokens",
        )
    try:
        validated_grammar(params.structured_outputs)
    except GrammarError as exc:
        raise RequestRejectedError(str(exc), "structured_outputs") from None


def make_core_requests(
    request_id: str,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    eos_token_ids: tuple[int, ...],
    arrival_time: float,
    group_id: str = "",
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
        )
        for index, core_id in enumerate(child_request_ids(request_id, params.n))
    ]
