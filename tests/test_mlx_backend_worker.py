"""The MLX generation thread's messages (backends/mlx/worker.py), with the GenerationLoop replaced by a
recording stand-in: it takes the core's commands in order and posts WorkerInfo, then one StepResult per
step, with a refused request finishing at once with its error. No mlx model is loaded."""

from __future__ import annotations

import queue
from collections.abc import Iterable
from pathlib import Path

from batchlm.backends.mlx.worker import GenerationWorker, WorkerEvent, WorkerInfo
from batchlm.config import EngineConfig
from batchlm.core.facts import EngineStats
from batchlm.engine.front_end import StepResult
from batchlm.outputs import EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams

TIMEOUT_S = 30.0


class StandInLoop:
    """One token (7) per running request per step, until the request is aborted."""

    def __init__(self) -> None:
        self.running: list[str] = []
        self.steps = 0
        self.closed = False

    def add_request(self, request: EngineCoreRequest) -> None:
        if not request.prompt_token_ids:
            raise ValueError("empty prompt")
        self.running.append(request.request_id)

    def abort_requests(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        aborted = [rid for rid in request_ids if rid in self.running]
        self.running = [rid for rid in self.running if rid not in aborted]
        return [EngineCoreOutput(rid, (), finish_reason=FinishReason.ABORT) for rid in aborted]

    def has_work(self) -> bool:
        return bool(self.running)

    def step(self) -> list[EngineCoreOutput]:
        self.steps += 1
        return [EngineCoreOutput(rid, (7,)) for rid in self.running]

    def fail_running(self, message: str) -> list[EngineCoreOutput]:
        raise AssertionError("no step fails here")

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running))

    def close(self) -> None:
        self.closed = True


class StandInWorker(GenerationWorker):
    def __init__(self, posts: queue.SimpleQueue[StepResult | WorkerEvent]) -> None:
        super().__init__(EngineConfig(), Path("/models/none"), posts.put)
        self.loop = StandInLoop()

    def _build_loop(self) -> StandInLoop:  # type: ignore[override]
        self._post(WorkerInfo(64, 100, self.model_dir, quantized=False))
        return self.loop


def request(request_id: str, prompt: tuple[int, ...]) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, prompt, SamplingParams(max_tokens=4), (0,), 0.0)


def test_commands_are_applied_in_order_and_each_step_posts_a_step_result() -> None:
    posts: queue.SimpleQueue[StepResult | WorkerEvent] = queue.SimpleQueue()
    worker = StandInWorker(posts)
    worker.start()
    assert posts.get(timeout=TIMEOUT_S) == WorkerInfo(64, 100, Path("/models/none"), quantized=False)

    worker.add([request("bad", ()), request("good", (1, 2))])
    first = posts.get(timeout=TIMEOUT_S)
    assert isinstance(first, StepResult)
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in first.outputs] == [
        ("bad", (), FinishReason.ERROR),
        ("good", (7,), None),
    ]
    assert first.outputs[0].error == "empty prompt"
    assert first.stats.num_running == 1

    worker.abort(["good", "unknown"])
    while True:  # steps run on until the abort is taken in
        result = posts.get(timeout=TIMEOUT_S)
        assert isinstance(result, StepResult)
        if result.outputs and result.outputs[0].finish_reason is FinishReason.ABORT:
            break
    assert [o.request_id for o in result.outputs] == ["good"]
    assert result.stats.num_running == 0

    worker.stop(TIMEOUT_S)
    assert not worker._thread.is_alive()
    assert worker.loop.closed
    assert posts.empty()


def test_a_failure_outside_a_step_posts_core_failed_and_ends_the_thread() -> None:
    from batchlm.executor.core_messages import CoreFailed

    posts: queue.SimpleQueue[StepResult | WorkerEvent] = queue.SimpleQueue()
    worker = StandInWorker(posts)

    def broken_has_work() -> bool:
        raise RuntimeError("lost the device")

    worker.loop.has_work = broken_has_work  # type: ignore[method-assign]
    worker.start()
    assert isinstance(posts.get(timeout=TIMEOUT_S), WorkerInfo)
    assert posts.get(timeout=TIMEOUT_S) == CoreFailed("RuntimeError: lost the device")
    worker._thread.join(TIMEOUT_S)
    assert not worker._thread.is_alive()
    assert worker.loop.closed
