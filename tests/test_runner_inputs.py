"""build_step_inputs: flat token rows, positions, slots and block tables from a SchedulerOutput."""

from __future__ import annotations

import pytest
import torch

from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID, ScheduledChunk, SchedulerOutput
from batchlm.runner.inputs import StepInputBuilder, build_step_inputs
from batchlm.runner.step_output import PreviousTokens

CPU = torch.device("cpu")


def _scheduled(*chunks: ScheduledChunk) -> SchedulerOutput:
    return SchedulerOutput(chunks=chunks, new_requests=(), finished_request_ids=frozenset())


def test_decode_and_prefill_rows() -> None:
    decode = ScheduledChunk("a", (7,), start_position=5, new_block_ids=(3, 9), sample=True)
    prefill = ScheduledChunk("b", (1, 2, 3), start_position=0, new_block_ids=(4,), sample=True)
    inputs = build_step_inputs(_scheduled(decode, prefill), block_size=4, device=CPU)
    assert inputs.input_ids.tolist() == [7, 1, 2, 3]
    assert inputs.positions.tolist() == [5, 0, 1, 2]
    # position 5 of "a" is block_ids[1]=9, offset 1 -> slot 37; "b" starts in block 4 -> 16, 17, 18
    assert inputs.meta.slot_mapping.tolist() == [37, 16, 17, 18]
    assert inputs.meta.query_start_loc.tolist() == [0, 1, 4]
    assert inputs.meta.seq_lens.tolist() == [6, 3]
    assert inputs.meta.block_tables.tolist() == [[3, 9], [4, 0]]
    assert inputs.meta.num_decodes == 1
    assert inputs.meta.max_query_len == 3 and inputs.meta.max_seq_len == 6
    assert inputs.sample_indices.tolist() == [0, 3]
    assert inputs.sample_request_ids == ["a", "b"]


def test_chunk_that_does_not_sample_is_skipped_and_crosses_blocks() -> None:
    first = ScheduledChunk("a", (10, 11, 12), start_position=3, new_block_ids=(2, 5), sample=False)
    second = ScheduledChunk("b", (20, 21), start_position=0, new_block_ids=(1,), sample=True)
    inputs = build_step_inputs(_scheduled(first, second), block_size=4, device=CPU)
    # positions 3, 4, 5 of "a": slot 2*4+3, then block 5 offsets 0 and 1
    assert inputs.meta.slot_mapping.tolist() == [11, 20, 21, 4, 5]
    assert inputs.sample_indices.tolist() == [4]
    assert inputs.sample_request_ids == ["b"]
    assert inputs.meta.num_decodes == 0


def test_placeholders_take_the_previous_steps_sampled_tokens() -> None:
    previous = PreviousTokens(torch.tensor([41, 42, 43]), {"b": 0, "a": 2, "gone": 1})
    steps = _scheduled(
        ScheduledChunk("a", (PLACEHOLDER_TOKEN_ID,), start_position=4, new_block_ids=(1, 2), sample=True),
        ScheduledChunk("b", (PLACEHOLDER_TOKEN_ID,), start_position=7, new_block_ids=(3, 4), sample=True),
        ScheduledChunk("c", (8, 9), start_position=0, new_block_ids=(5,), sample=True),
    )
    inputs = build_step_inputs(steps, block_size=4, device=CPU, previous=previous)
    assert inputs.input_ids.tolist() == [43, 41, 8, 9]
    assert inputs.positions.tolist() == [4, 7, 0, 1]
    assert inputs.meta.slot_mapping.tolist() == [8, 19, 20, 21]


def test_placeholder_without_a_previous_sample_is_an_error() -> None:
    chunk = ScheduledChunk("a", (PLACEHOLDER_TOKEN_ID,), start_position=4, new_block_ids=(1, 2), sample=True)
    with pytest.raises(RuntimeError, match="request 'a' has a placeholder token"):
        build_step_inputs(_scheduled(chunk), block_size=4, device=CPU, previous=None)
    previous = PreviousTokens(torch.tensor([7]), {"b": 0})
    with pytest.raises(RuntimeError, match="request 'a' has a placeholder token"):
        build_step_inputs(_scheduled(chunk), block_size=4, device=CPU, previous=previous)


def test_builder_keeps_tables_across_steps_and_forgets_dropped_requests() -> None:
    builder = StepInputBuilder(block_size=2, device=CPU)
    first = builder.build(_scheduled(ScheduledChunk("a", (1, 2, 3), 0, (6, 7), True)))
    assert first.meta.block_tables.tolist() == [[6, 7]]
    second = builder.build(_scheduled(ScheduledChunk("a", (4, 5), 3, (9,), True)))  # block 9 appended
    assert second.meta.block_tables.tolist() == [[6, 7, 9]]
    assert second.meta.slot_mapping.tolist() == [15, 18]  # position 3 -> block 7 offset 1; 4 -> block 9
    builder.drop(["a"])
    third = builder.build(_scheduled(ScheduledChunk("a", (1,), 0, (2,), True)))
    assert third.meta.block_tables.tolist() == [[2]]
