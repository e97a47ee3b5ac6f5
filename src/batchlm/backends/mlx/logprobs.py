"""Turn mlx log-probability vectors into TokenLogprobs, batched into one evaluation per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

from batchlm.outputs import TokenLogprobs


@dataclass(frozen=True)
class LogprobsQuery:
    """One generated token whose logprobs a request asked for."""

    # log_softmax over the vocabulary, [V].
    logprobs: mx.array
    token_id: int
    # How many top alternatives to report (SamplingParams.logprobs).
    num_top: int


def token_logprobs(queries: Sequence[LogprobsQuery]) -> list[TokenLogprobs]:
    """TokenLogprobs for each query, in order. The rank counts strictly more likely tokens, plus one."""
    if not queries:
        return []
    table = mx.stack([q.logprobs.astype(mx.float32) for q in queries])  # [Q, V]
    chosen_ids = mx.array([[q.token_id] for q in queries])  # [Q, 1]
    chosen = mx.take_along_axis(table, chosen_ids, axis=-1)  # [Q, 1]
    ranks = (table > chosen).sum(axis=-1) + 1  # [Q]
    num_top = min(max(q.num_top for q in queries), table.shape[1])
    top_ids = top_values = None
    if num_top > 0:
        top_ids, top_values = _top_k(table, num_top)
        mx.eval(chosen, ranks, top_ids, top_values)
    else:
        mx.eval(chosen, ranks)
    chosen_list = cast(list[float], chosen[:, 0].tolist())
    rank_list = cast(list[int], ranks.tolist())
    no_top: list[list[Any]] = [[] for _ in queries]
    ids_list = cast(list[list[int]], top_ids.tolist()) if top_ids is not None else no_top
    values_list = cast(list[list[float]], top_values.tolist()) if top_values is not None else no_top
    results = []
    for index, query in enumerate(queries):
        pairs = zip(ids_list[index][: query.num_top], values_list[index][: query.num_top], strict=True)
        top = tuple((int(token_id), float(value)) for token_id, value in pairs)
        results.append(TokenLogprobs(logprob=float(chosen_list[index]), rank=int(rank_list[index]), top=top))
    return results


def _top_k(table: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest entries of each row, most likely first: ids [Q, K] and values [Q, K]."""
    candidates = mx.argpartition(-table, kth=k - 1, axis=-1)[:, :k]  # [Q, K], unordered
    values = mx.take_along_axis(table, candidates, axis=-1)  # [Q, K]
    order = mx.argsort(-values, axis=-1)  # [Q, K]
    return mx.take_along_axis(candidates, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
