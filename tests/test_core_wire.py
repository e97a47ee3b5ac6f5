"""Step outputs on the core -> front end pipe: packed into columns, unpacked to the same outputs."""

from __future__ import annotations

import pickle

from batchlm.core.facts import EngineStats
from batchlm.executor.core_messages import StepOutputs
from batchlm.outputs import CoreOutputs, EngineCoreOutput, FinishReason, TokenLogprobs


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
    packed = pickle.loads(pickle.dumps(StepOutputs(CoreOutputs.of(outputs), stats)))
    assert packed.unpack() == outputs
    assert packed.stats == stats
    # Only outputs with more than ids and tokens travel whole.
    assert sorted(packed.outputs.whole) == [1, 3, 4, 5, 6]


def test_an_empty_step_packs_to_empty_columns() -> None:
    assert StepOutputs(CoreOutputs(), EngineStats()).unpack() == []


def test_core_outputs_keep_their_order_through_extend_select_and_stamping() -> None:
    first = CoreOutputs()
    first.add_token("a", 1)
    first.append(EngineCoreOutput("b", (2,), finish_reason=FinishReason.LENGTH))
    second = CoreOutputs.of([EngineCoreOutput("c", (3,), num_cached_tokens=16), EngineCoreOutput("d", (4,))])
    first.extend(second)
    assert [(o.request_id, o.new_token_ids) for o in first] == [
        ("a", (1,)),
        ("b", (2,)),
        ("c", (3,)),
        ("d", (4,)),
    ]
    assert sorted(first.whole) == [1, 2]
    assert first.finished_request_ids() == ["b"]

    # A plain output stamped with its scheduling time travels whole from then on.
    first.set_scheduled_time(3, 42.0)
    first.set_scheduled_time(2, 43.0)
    assert list(first)[3] == EngineCoreOutput("d", (4,), scheduled_time=42.0)
    assert list(first)[2] == EngineCoreOutput("c", (3,), num_cached_tokens=16, scheduled_time=43.0)

    picked = first.select([3, 0, 1])
    assert picked == [
        EngineCoreOutput("d", (4,), scheduled_time=42.0),
        EngineCoreOutput("a", (1,)),
        EngineCoreOutput("b", (2,), finish_reason=FinishReason.LENGTH),
    ]
    assert sorted(picked.whole) == [0, 2]
    assert first.select([]) == CoreOutputs() and len(first.select([])) == 0
