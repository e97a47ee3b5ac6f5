"""A long-running server holds nothing of the requests it served: after mixed traffic (finishes, stop
strings, n > 1, batches, grammars, penalties, prompt logprobs, aborts, client disconnects before and
after the first token, 400s, 429s when a burst overflows the queue, preemption) every per-request container of the front end, the engine core,
the scheduler, the KV cache and the model runner is empty again, every KV block is free, and the
event loop runs no task the idle server did not run before the traffic."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchlm import LLM, SamplingParams
from batchlm.config import EngineConfig
from batchlm.core.engine_core import EngineCore
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.engine.output_processor import make_core_requests
from batchlm.runner.model_runner import ModelRunner
from batchlm.sampling_params import StructuredOutputs
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import wait_until

pytestmark = pytest.mark.slow


def held_by_core(core: EngineCore) -> dict[str, int]:
    """What the core, its scheduler and its runner still hold for requests (all 0 when idle)."""
    scheduler = core.scheduler
    kv = scheduler.kv
    held = {
        "scheduler requests": len(scheduler._requests),
        "waiting": len(scheduler._waiting),
        "running": len(scheduler._running),
        "to drop from the runner": len(scheduler._dropped_ids),
        "steps in flight": scheduler.num_inflight_steps + (core._in_flight is not None),
        "block tables": len(kv._tables),
        "pending prefix blocks": len(kv._pending),
        "KV blocks in use": kv.pool.num_used,
        "admission tickets": len(scheduler._tickets._tickets) + scheduler._tickets.num_groups,
        "first-scheduled times": len(core._first_scheduled),
    }
    if scheduler._speculative is not None:
        held["speculated requests"] = len(scheduler._speculative.speculator._tracked)
        held["verifies in flight"] = len(scheduler._speculative.in_flight)
    runner = core.executor
    assert isinstance(runner, ModelRunner)
    held |= {
        "runner sampling states": len(runner.states),
        "runner penalized": len(runner._penalized_ids),
        "runner prompt logprobs": len(runner.prompt_logprobs._gathered),
        "runner block-table rows": len(runner.input_builder.block_tables),
        "runner grammar matchers": len(runner.grammars),
        "sampler's cached batch": runner.sampler._cached is not None,
        "prepared grammar matchers": _prepared_matchers(runner),
    }
    return {name: count for name, count in held.items() if count}


def _prepared_matchers(runner: ModelRunner) -> int:
    """The matchers the mask worker keeps prepared, once its jobs so far have run."""
    grammars = runner.grammars
    if grammars._worker is None:
        return 0
    grammars._worker.submit(lambda: None).result(60)
    batch = grammars._batch
    return 0 if batch is None else len(batch.sequences)


# -- the engine core, driven directly ------------------------------------------------------------------

CONSTRAINED = StructuredOutputs(regex="[a-z]{1,30}")


def mixed_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=1, max_tokens=6, n=2, structured_outputs=CONSTRAINED),
        SamplingParams(temperature=1.0, seed=2, max_tokens=6, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, logprobs=1),
        # Two long ones: together more than a small cache holds.
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["a", "e", " "]),
    ]


@pytest.mark.parametrize(
    "config",
    [{}, {"async_scheduling": "on"}, {"speculative": "ngram"}, {"num_gpu_blocks_override": 4}],
    ids=["sync", "async", "speculative", "preempting"],
)
def test_the_engine_core_holds_nothing_once_its_requests_ended(
    tiny_model_dir: Callable[..., Path], config: dict[str, Any]
) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", max_num_seqs=3, max_model_len=96, **config)
    core = llm.engine_core
    prompts = [
        [1, 5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 4],
        [1, 7],
        [1, 5, 9, 5, 9, 5, 9],
        [2, 3, 4],
    ]
    params = mixed_params()
    for round_ in range(2):
        outputs = llm.generate([prompts[i % len(prompts)] for i in range(len(params))], params)
        assert all(o.finished for o in outputs)
        assert held_by_core(core) == {}, f"after finishing, round {round_}"
        # Aborted once the runner has taken them on.
        core_ids = []
        for index, each in enumerate(params):
            validated = llm._validated(prompts[index % len(prompts)], each)
            for request in make_core_requests(
                f"abort-{round_}-{index}", validated.prompt_token_ids, validated.params, (1,), time.time()
            ):
                core.add_request(request)
                core_ids.append(request.request_id)
        for _ in range(3):
            core.step()
        core.abort_requests(core_ids)
        while core.has_work():
            core.step()
        assert held_by_core(core) == {}, f"after aborting, round {round_}"
    if "num_gpu_blocks_override" in config:
        assert core.stats().num_preemptions > 0


# -- the server, over HTTP -----------------------------------------------------------------------------

MAX_NUM_SEQS = 3
MAX_QUEUE = 3
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hello there"}]
LONG = {"max_tokens": 60, "ignore_eos": True}


@pytest.fixture(scope="module")
def served(tiny_model_dir: Callable[..., Path]) -> Iterator[BackgroundServer]:
    config = EngineConfig(
        model=str(tiny_model_dir("llama")), device="cpu", max_num_seqs=MAX_NUM_SEQS, max_model_len=128
    )
    engine = AsyncLLMEngine(config, max_queue=MAX_QUEUE, multiprocess=False)
    settings = ServerSettings(max_queue=MAX_QUEUE, max_n=3)
    running = BackgroundServer(engine, settings, start_engine=engine.start).start()
    running.wait_until_ready(180)
    yield running
    running.stop()


def core_of(engine: AsyncLLMEngine) -> EngineCore:
    """The engine core running in the engine's thread (multiprocess=False), from that thread's frames."""
    thread = engine._worker
    assert isinstance(thread, threading.Thread) and thread.ident is not None
    frame = sys._current_frames()[thread.ident]
    while frame is not None and frame.f_code.co_name != "engine_core_main":
        frame = frame.f_back  # type: ignore[assignment]
    assert frame is not None, "the engine core's thread is not in engine_core_main"
    core = frame.f_locals["core"]
    assert isinstance(core, EngineCore)
    return core


def held_by_front_end(server: BackgroundServer) -> dict[str, int]:
    engine = server.engine
    assert isinstance(engine, AsyncLLMEngine) and engine._processor is not None
    held = {
        "in-flight generations": len(server.state.in_flight),
        "output collectors": len(engine._collectors),
        "output processor requests": len(engine._processor._requests),
        "output processor sequences": len(engine._processor._sequences),
    }
    return {name: count for name, count in held.items() if count}


def loop_tasks(server: BackgroundServer) -> set[asyncio.Task[Any]]:
    async def others() -> set[asyncio.Task[Any]]:
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    loop = server.engine._loop  # type: ignore[attr-defined]
    return asyncio.run_coroutine_threadsafe(others(), loop).result(60)


async def _stream_and_hang_up(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], events: int
) -> None:
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= events:
                return


async def _hang_up_at_once(port: int, path: str, body: dict[str, Any]) -> None:
    """The whole request sent, then the connection closed before any answer."""
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


def mixed_traffic() -> list[tuple[str, str, dict[str, Any], int]]:
    """(kind, path, body, events before hanging up) for each request of a round."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    return [
        ("post", COMPLETIONS, {"prompt": "once upon", "max_tokens": 6}, 0),
        ("post", COMPLETIONS, {"prompt": "once upon", "max_tokens": 6, "stream": True}, 0),
        ("post", CHAT, {"messages": MESSAGES, "max_tokens": 8, "n": 2, "stop": ["e", "a"]}, 0),
        ("post", COMPLETIONS, {"prompt": ["a b", "c d", "e"], "max_tokens": 6, "logprobs": 2}, 0),
        ("post", COMPLETIONS, {"prompt": "x y z", "max_tokens": 4, "prompt_logprobs": 1}, 0),
        (
            "post",
            CHAT,
            {"messages": MESSAGES, "max_tokens": 8, "response_format": {"type": "json_object"}},
            0,
        ),
        ("post", CHAT, {"messages": MESSAGES, "max_tokens": 8, "presence_penalty": 0.5}, 0),
        (
            "post",
            CHAT,
            {"messages": MESSAGES, "max_tokens": 8, "tools": [tool], "tool_choice": "required"},
            0,
        ),
        ("post", "/v1/responses", {"input": "hello", "max_output_tokens": 6}, 0),
        ("post", COMPLETIONS, {"prompt": "a", "max_tokens": 4, "temperature": -1}, 0),  # 400
        ("post", COMPLETIONS, {"prompt": ["a", "b " * 200], "max_tokens": 4}, 0),  # 400: one prompt too long
        ("stream", COMPLETIONS, {"prompt": "once", **LONG}, 2),
        ("stream", CHAT, {"messages": MESSAGES, "n": 3, **LONG}, 3),
        ("stream", COMPLETIONS, {"prompt": ["p", "q"], **LONG}, 1),
        ("stream", CHAT, {"messages": MESSAGES, "response_format": {"type": "json_object"}, **LONG}, 2),
        ("stream", "/v1/responses", {"input": "hello", "max_output_tokens": 60}, 3),
        ("hang up", COMPLETIONS, {"prompt": "once", **LONG}, 0),
        ("hang up", CHAT, {"messages": MESSAGES, "n": 2, **LONG}, 0),
    ]


async def _send_round(server: BackgroundServer) -> list[int | str]:
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:

        async def one(kind: str, path: str, body: dict[str, Any], events: int) -> int | str:
            if kind == "post":
                return (await client.post(path, json=body)).status_code
            if kind == "stream":
                await _stream_and_hang_up(client, path, body, events)
                return "hung up mid-stream"
            await _hang_up_at_once(server.port, path, body)
            return "hung up"

        return await asyncio.gather(*(one(*request) for request in mixed_traffic()))


def test_the_server_holds_nothing_once_mixed_traffic_ended(served: BackgroundServer) -> None:
    engine = served.engine
    assert isinstance(engine, AsyncLLMEngine)
    core = core_of(engine)
    idle_tasks = loop_tasks(served)
    statuses: set[int | str] = set()
    for _ in range(2):
        statuses.update(asyncio.run(_send_round(served)))

        def idle() -> bool:
            return not held_by_front_end(served) and not held_by_core(core)

        wait_until(idle, 120, "the server to let go of every request")
    # Served and refused as invalid (a burst past the batch and the queue may also be refused, 429).
    assert {200, 400} <= statuses, statuses
    assert loop_tasks(served) <= idle_tasks
    assert httpx.get(f"{served.base_url}/health").status_code == 200
