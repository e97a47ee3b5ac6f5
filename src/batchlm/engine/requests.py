"""Fan a validated request out into engine-core requests, one per completion."""

from __future__ import annotations

from collections.abc import Sequence

from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams


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
