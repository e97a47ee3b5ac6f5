"""Verify chunks in the runner: every position of a verify chunk is sampled as if the tokens before it
had been decoded one by one, and the drafts are accepted while each equals the token sampled at its
position.

Sampling at every position and accepting a draft when the sample equals it is rejection sampling for a
draft that is a point mass: a draft d is accepted with probability p(d), and a rejection leaves a token
distributed as p with d removed and renormalized. So the output follows the target distribution exactly,
greedy output equals greedy decoding, and a seeded request (whose position i draws only from its own
generator seeded for i) produces the very tokens it would without speculation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from batchlm.core.step_io import AcceptedDrafts, ModelRunnerOutput, SchedulerOutput
from batchlm.core.token_runs import common_prefix_length
from batchlm.outputs import TokenLogprobs
from batchlm.sampling.state import SamplingState


@dataclass(frozen=True)
class VerifyGroup:
    """The sampled rows of one verify chunk: first_row .. first_row + len(drafts)."""

    request_id: str
    first_row: int
    draft_token_ids: tuple[int, ...]


def verify_groups(scheduled: SchedulerOutput) -> list[VerifyGroup]:
    """The step's verify chunks with their first sampled row (rows follow the sampling chunks in order)."""
    groups: list[VerifyGroup] = []
    row = 0
    for chunk in scheduled.chunks:
        if not chunk.sample:
            continue
        if chunk.num_draft_tokens:
            drafts = chunk.token_ids[len(chunk.token_ids) - chunk.num_draft_tokens :]
            groups.append(VerifyGroup(chunk.request_id, row, drafts))
        row += 1 + chunk.num_draft_tokens
    return groups


def row_states(
    states: Mapping[str, SamplingState], request_ids: Sequence[str], groups: Sequence[VerifyGroup]
) -> list[SamplingState]:
    """The sampling state of each sampled row. Row i of a verify group samples after i drafts: a copy of
    the request's state whose output holds them, so seeding and every position-dependent rule see the
    position that row stands for."""
    result = [states[request_id] for request_id in request_ids]
    for group in groups:
        state = result[group.first_row]
        for offset in range(1, len(group.draft_token_ids) + 1):
            outputs = [*state.output_token_ids, *group.draft_token_ids[:offset]]
            result[group.first_row + offset] = replace(state, output_token_ids=outputs, token_stats=None)
    return result


@dataclass(frozen=True)
class Verification:
    """Turns a step's per-row samples into its ModelRunnerOutput, and gives each verified request's
    state the tokens it gained (its first row's slot holds the first of them already)."""

    groups: tuple[VerifyGroup, ...]
    # The requests' own states (not the per-row copies), by request id.
    states: Mapping[str, SamplingState]

    def output(
        self,
        row_request_ids: Sequence[str],
        token_ids: Sequence[int],
        logprobs: Sequence[TokenLogprobs | None],
    ) -> ModelRunnerOutput:
        request_ids: list[str] = []
        sampled: list[int] = []
        sampled_logprobs: list[TokenLogprobs | None] = []
        accepted: dict[str, AcceptedDrafts] = {}
        groups = {group.first_row: group for group in self.groups}
        row = 0
        while row < len(token_ids):
            group = groups.get(row)
            count = 0
            if group is not None:
                num_rows = 1 + len(group.draft_token_ids)
                # The leading drafts equal to the tokens sampled at their positions.
                count = common_prefix_length(token_ids[row : row + num_rows], group.draft_token_ids)
                accepted[group.request_id] = AcceptedDrafts(
                    tuple(token_ids[row : row + count]), tuple(logprobs[row : row + count])
                )
                self.states[group.request_id].output_token_ids.extend(token_ids[row + 1 : row + count + 1])
                row_next = row + num_rows
            else:
                row_next = row + 1
            request_ids.append(row_request_ids[row])
            sampled.append(token_ids[row + count])
            sampled_logprobs.append(logprobs[row + count])
            row = row_next
        return ModelRunnerOutput(tuple(request_ids), tuple(sampled), tuple(sampled_logprobs), accepted)
