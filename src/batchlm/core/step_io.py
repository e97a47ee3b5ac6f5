"""The typed hand-off between the scheduler and the model runner for one engine step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from batchlm.outputs import TokenLogprobs
from batchlm.sampling_params import SamplingParams

# Stands in ScheduledChunk.token_ids for a token the step in flight is still sampling (async scheduling):
# the runner puts the real id in place on the device, from that step's sampled-token tensor.
PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True)
class NewRequestData:
    """Sent the first step a request is scheduled, and again after it was preempted (the runner
    must then forget what it held for it and start over from this data)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    # Tokens generated before a preemption (empty for a fresh request); they are recomputed.
    output_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    # Seed for this sequence's private generator; None = the engine's shared generator.
    seed: int | None
    # Tokens that end generation (the sampler masks them until min_tokens are generated).
    eos_token_ids: tuple[int, ...]
    # Rotate its tokens with the model's long rotation (SchedulerConfig.long_rope_after).
    long_rope: bool = False


@dataclass(slots=True)
class ScheduledChunk:
    """The tokens of one request computed this step (a decode is a chunk of one token). Treated as
    immutable, but not frozen: one is made per running request per step, and a frozen dataclass's
    __init__ costs several times as much, on the engine core's critical path."""

    request_id: str
    # Token ids to feed the model: all_token_ids[start_position : start_position + len(token_ids)].
    # Under async scheduling the last one may be PLACEHOLDER_TOKEN_ID: the token this request samples in
    # the step launched just before this one, not yet known on the host.
    token_ids: tuple[int, ...]
    # Position of token_ids[0]; equals the number of tokens already in the KV cache.
    start_position: int
    # KV-cache block ids appended to the request's block table since its last chunk (in order): its
    # whole table in its first chunk and in the first after a preemption (the runner dropped the old
    # one with finished_request_ids); empty while the table is unchanged. The runner keeps the tables.
    new_block_ids: tuple[int, ...]
    # True when this chunk reaches the end of the known tokens, so a token is sampled after it.
    sample: bool
    # Speculation: the last this many token_ids are draft tokens, not known ones. Every position from
    # the last known token on is sampled, and the drafts are accepted while they match (a verify chunk).
    num_draft_tokens: int = 0


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's work. Chunks are ordered decodes first, then prefill chunks."""

    chunks: tuple[ScheduledChunk, ...]
    # Requests the runner sees for the first time (or again after preemption).
    new_requests: tuple[NewRequestData, ...]
    # Requests finished, aborted or preempted since the last step: the runner drops their state.
    finished_request_ids: frozenset[str]
    # Blocks whose contents the runner must copy before this step: (src, dst) pairs. Empty unless a
    # scheduler policy needs copy-on-write.
    block_copies: tuple[tuple[int, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class AcceptedDrafts:
    """The draft tokens a verify chunk accepted, in order (the first rejected one and all after it are
    dropped); the request's sampled token follows them."""

    token_ids: tuple[int, ...]
    # Parallel to token_ids; None entries when the request did not ask for logprobs.
    logprobs: tuple[TokenLogprobs | None, ...]


@dataclass(frozen=True)
class ModelRunnerOutput:
    """Tokens sampled this step, one per chunk with `sample=True`, in chunk order."""

    request_ids: tuple[str, ...]
    sampled_token_ids: tuple[int, ...]
    # Parallel to request_ids; None for requests that did not ask for logprobs.
    logprobs: tuple[TokenLogprobs | None, ...]
    # Verify chunks: request id -> the drafts accepted before its sampled token (every verify chunk
    # has an entry, possibly empty).
    accepted_drafts: Mapping[str, AcceptedDrafts] = field(default_factory=dict)
    # Requests that asked SamplingParams.prompt_logprobs and sampled their first token this step:
    # request id -> one entry per prompt token after the first.
    prompt_logprobs: Mapping[str, tuple[TokenLogprobs, ...]] = field(default_factory=dict)
    # Constrained requests whose grammar failed (it allows only EOS from then on): request id -> the
    # error they end with, whatever their token this step.
    grammar_failures: Mapping[str, str] = field(default_factory=dict)
