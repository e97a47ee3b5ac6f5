"""Log-probabilities of the sampled tokens: gathered on the device into one packed tensor, so that a
single device->host copy brings back token ids and logprob data together, then unpacked on the host."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from batchlm.outputs import TokenLogprobs
from batchlm.sampling.state import SamplingState

# float32 represents every integer below 2**24 exactly, so token ids and ranks can share the
# logprobs' dtype in the packed tensor.
MAX_PACKED_VOCAB = 1 << 24

# Packed columns: sampled token id, its logprob, its rank, then K top ids and K top logprobs.
_FIXED_COLUMNS = 3


def pack_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> torch.Tensor:
    """Gather what TokenLogprobs needs into one float32 tensor [B, 3 + 2 * num_top].

    raw_logprobs [B, V]: log_softmax of the unprocessed logits; token_ids [B] int64: sampled tokens.
    The rank counts the tokens strictly more likely than the sampled one, plus one.
    """
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1))  # [B, 1]
    rank = (raw_logprobs > sampled).sum(dim=-1, keepdim=True) + 1  # [B, 1] int64
    columns = [token_ids.unsqueeze(1).float(), sampled, rank.float()]
    if num_top > 0:
        top_logprobs, top_ids = raw_logprobs.topk(num_top, dim=-1)  # [B, K] each, most likely first
        columns += [top_ids.float(), top_logprobs]
    return torch.cat(columns, dim=1)


def unpack_logprobs(
    packed_rows: list[list[float]], states: Sequence[SamplingState]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Split host rows of pack_logprobs' output into token ids and per-request TokenLogprobs (None
    where the request did not ask), trimming the top list to each request's own k."""
    token_ids: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    for row, state in zip(packed_rows, states, strict=True):
        token_ids.append(int(row[0]))
        wanted = state.params.logprobs
        logprobs.append(None if wanted is None else _token_logprobs(row, wanted))
    return token_ids, logprobs


def _token_logprobs(row: list[float], wanted: int) -> TokenLogprobs:
    num_top = (len(row) - _FIXED_COLUMNS) // 2
    ids = row[_FIXED_COLUMNS : _FIXED_COLUMNS + wanted]
    values = row[_FIXED_COLUMNS + num_top : _FIXED_COLUMNS + num_top + wanted]
    top = tuple((int(token_id), value) for token_id, value in zip(ids, values, strict=True))
    return TokenLogprobs(logprob=row[1], rank=int(row[2]), top=top)


def target_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    """TokenLogprobs of given tokens (a prompt's next tokens) under rows of raw logprobs, on the host."""
    return [_token_logprobs(row, num_top) for row in pack_logprobs(raw_logprobs, token_ids, num_top).tolist()]
