"""build_step_inputs: flat token rows, positions, slots and block tables from a SchedulerOutput."""

from __future__ import annotations

import torch

from batchlm.core.step_io import ScheduledChunk, SchedulerOutput
from batchlm.runner.inputs import build_step_inputs

CPU = torch.device("cpu")


def _scheduled(*chunks: ScheduledChunk) -> SchedulerOutput:
    return SchedulerOutput(chunks=chunks, new_requests=(), finished_request_ids=frozenset())


def test_decode_and_prefill_rows() -> None:
    decode = ScheduledChunk("a", (7,), start_position=5, block_ids=(3, 9), sample=True)
    prefill = ScheduledChunk("b", (1, 2, 3), start_position=0, block_ids=(4,), sample=True)
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
    first = ScheduledChunk("a", (10, 11, 12), start_position=3, block_ids=(2, 5), sample=False)
    second = ScheduledChunk("b", (20, 21), start_position=0, block_ids=(1,), sample=True)
    inputs = build_step_inputs(_scheduled(first, second), block_size=4, device=CPU)
    # positions 3, 4, 5 of "a": slot 2*4+3, then block 5 offsets 0 and 1
    assert inputs.meta.slot_mapping.tolist() == [11, 20, 21, 4, 5]
    assert inputs.sample_indices.tolist() == [4]
    assert inputs.sample_request_ids == ["b"]
    assert inputs.meta.num_decodes == 0
