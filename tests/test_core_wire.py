"""Step outputs on the core -> front end pipe: packed into columns, unpacked to the same outputs."""

from __future__ import annotations

import pickle

from batchlm.core.facts import EngineStats
from batchlm.executor.core_messages import StepOutputs
from batchlm.outputs import EngineCoreOutput, FinishReason, TokenLogprobs


def test_pack_round_trips_every_field_through_pickle() -> None:
    outputs = [
        EngineCoreOutput("plain", (7,)),
        EngineCoreOutput("first", (8,), num_cached_tokens=32, scheduled_time=12.5),
        EngineCoreOutput("two tokens", (9, 10)),
        EngineCoreOutput("with logprobs", (11,), new_logprobs=(TokenLogprobs(-0.5, 1, ((11, -0.5),)),)),
        EngineCoreOutput("eos", (2,), finish_reason=FinishReason.STOP, stop_token_id=2),
        EngineCoreOutput("aborted", (), finish_reason=FinishReason.ABORT),
        EngineCoreOutput("failed", (), finish_reason=FinishReason.ERROR, error="out of memory"),
    ]
    stats = EngineStats(num_running=7)
    packed = pickle.loads(pickle.dumps(StepOutputs.pack(outputs, stats)))
    assert packed.unpack() == outputs
    assert packed.stats == stats
    # Only outputs with more than ids and tokens travel whole.
    assert [index for index, _ in packed.whole] == [1, 3, 4, 5, 6]


def test_an_empty_step_packs_to_empty_columns() -> None:
    assert StepOutputs.pack([], EngineStats()).unpack() == []
