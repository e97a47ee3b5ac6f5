"""Tensor parallelism on CPU with gloo: TP=2 gives TP=1's tokens, the collectives sit where they should,
and a dead worker stops the engine with a clear error (offline and behind the server)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.executor.tensor_parallel import (
    TensorParallelError,
    TensorParallelExecutor,
    build_tensor_parallel_executor,
    worker_devices,
)
from batchlm.parallel.group import TensorParallelGroup
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import wait_until

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, ignore_eos=True, seed=1234)
# Small KV caches: allocating the default 2 GiB per rank would dominate the test's run time.
ENGINE_ARGS: dict[str, Any] = {"device": "cpu", "cpu_kv_cache_gib": 0.02, "max_num_batched_tokens": 24}


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(10, 2000, (n,), generator=generator).tolist() for n in (5, 23, 12, 1, 30)]


def _run(llm: LLM, params: SamplingParams) -> list[tuple[list[int], Any]]:
    outputs = llm.generate(_prompts(), params)
    return [(out.outputs[0].token_ids, out.outputs[0].logprobs) for out in outputs]


def _assert_same_greedy(tp2: LLM, tp1: LLM) -> None:
    """Greedy tokens identical; logprobs (ranks, top-2) equal to float tolerance."""
    got, expected = _run(tp2, GREEDY), _run(tp1, GREEDY)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, got_lp), (_, want_lp) in zip(got, expected, strict=True):
        assert len(got_lp) == len(want_lp)
        for got_step, want_step in zip(got_lp, want_lp, strict=True):
            assert got_step.rank == want_step.rank
            assert got_step.logprob == pytest.approx(want_step.logprob, abs=1e-4)
            assert [t for t, _ in got_step.top] == [t for t, _ in want_step.top]  # same top-2, same order
            assert [lp for _, lp in got_step.top] == pytest.approx([lp for _, lp in want_step.top], abs=1e-4)


def _executor(llm: LLM) -> TensorParallelExecutor:
    executor = llm.engine_core.executor
    assert isinstance(executor, TensorParallelExecutor)
    return executor


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


# -- collectives, without processes ------------------------------------------------------------------


@dataclass(frozen=True)
class CountingGroup(TensorParallelGroup):
    """Rank 0 of a pretend group: collectives are counted and faked (gather repeats the local part)."""

    calls: list[str] = field(default_factory=list)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_reduce")
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self.calls.append("all_gather")
        return torch.cat([tensor] * self.size, dim=dim)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_one_all_reduce_per_attention_and_mlp_block(
    tiny_model_dir: Callable[..., Path], model_type: str
) -> None:
    from batchlm.models.loader import load_model
    from models_harness import Chunk, make_kv_caches, run_step

    group = CountingGroup(rank=0, size=2)
    loaded = load_model(
        tiny_model_dir(model_type), torch.float32, torch.device("cpu"), tp=group, progress=False
    )
    run_step(loaded.model, make_kv_caches(loaded, 4), [Chunk([5, 6, 7], 0, [0])])
    layers = loaded.shape.num_layers
    # The embedding's all-reduce, then o_proj and down_proj of every layer; one gather for the logits.
    assert group.calls == ["all_reduce"] * (1 + 2 * layers) + ["all_gather"]
    assert loaded.shape.num_heads == 2 and loaded.shape.num_kv_heads == 1


@pytest.mark.parametrize(
    ("overrides", "size", "error"),
    [
        (
            {"num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 48},
            2,
            "num_attention_heads (3) is not divisible by the tensor-parallel size 2",
        ),
        (
            {"intermediate_size": 129},
            2,
            "intermediate_size (129) is not divisible by the tensor-parallel size 2",
        ),
        # Fewer KV heads than ranks: each is replicated, which needs a whole number of ranks per head.
        (
            {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96},
            3,
            "num_key_value_heads (2) does not divide the tensor-parallel size 3",
        ),
    ],
    ids=["heads", "intermediate", "kv-heads"],
)
def test_sizes_that_do_not_split_name_the_config_field(
    tiny_model_dir: Callable[..., Path], overrides: dict[str, int], size: int, error: str
) -> None:
    from batchlm.models.loader import load_model

    with pytest.raises(ValueError, match=re.escape(error)):
        load_model(
            tiny_model_dir("llama", **overrides),
            torch.float32,
            torch.device("cpu"),
            tp=CountingGroup(rank=1, size=size),
            progress=False,
        )


def test_worker_devices() -> None:
    assert worker_devices("cpu", 2) == ["cpu", "cpu"]
    if not torch.cuda.is_available():
        assert worker_devices("auto", 3) == ["cpu"] * 3
        with pytest.raises(
            ValueError, match=r"tensor-parallel-size 2 from cuda:1 needs GPUs cuda:1\.\.cuda:2"
        ):
            worker_devices("cuda:1", 2)
    with pytest.raises(ValueError, match="'mps' is not supported with tensor parallelism"):
        worker_devices("mps", 2)


def _sigterm_from_another_process(spec: Any, conn: Any, news: Any) -> None:
    """A worker's start as far as its SIGTERM handling, in a process where a thread already runs
    (as numpy's BLAS threads do once a script's imports load it), then a SIGTERM sent by a process
    other than the executor's (here the worker itself; a group's or a service's, in use)."""
    import threading

    from batchlm.executor.worker import _take_sigterm_from_parent_only

    done = threading.Event()
    threading.Thread(target=done.wait, daemon=True).start()
    _take_sigterm_from_parent_only(spec.parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)  # a thread that took it with its default action ends us here
    conn.send("alive")
    done.set()


@pytest.mark.skipif(
    not hasattr(signal, "sigwaitinfo"), reason="SIGTERM ends workers where it cannot be waited for"
)
def test_a_worker_outlives_a_sigterm_not_from_its_executor_whatever_threads_it_started_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import batchlm.executor.tensor_parallel as tensor_parallel

    monkeypatch.setattr(tensor_parallel, "worker_main", _sigterm_from_another_process)
    processes, conns, news = tensor_parallel._spawn_workers(EngineConfig(), tmp_path, ["cpu"], 0)
    try:
        assert conns[0].poll(60), "the worker neither answered nor exited"
        assert conns[0].recv() == "alive"
    finally:
        for process in processes:
            process.join(60)
            if process.is_alive():
                process.kill()
        for conn in [*conns, news]:
            conn.close()


def test_cpu_ranks_share_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import batchlm.runner.cpu_threads as cpu_threads
    from batchlm.executor.tensor_parallel import rank_threads

    # torch counts the host's 64 cores; a container's quota grants 4 CPUs.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: 4)
    assert rank_threads(2) == 2
    assert rank_threads(8) == 1
    # Fewer torch threads than CPUs (BATCHLM_CORE_THREADS): the threads are shared out.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert rank_threads(2) == 1


def test_a_failed_step_says_why_on_its_first_line() -> None:
    """A rank's error in a step reaches clients as the first line of the reason (CoreFailed.after):
    that line must carry the error, with the traceback after it for the log."""
    import multiprocessing
    import pickle

    from batchlm.core.step_io import SchedulerOutput
    from batchlm.executor.core_messages import CoreFailed
    from batchlm.executor.messages import ExecuteStep, WorkerFailed
    from batchlm.executor.wire import encode_step
    from batchlm.executor.worker import serve

    class FailingRunner:
        def execute(self, scheduled: SchedulerOutput) -> None:
            raise RuntimeError("could not allocate 12 bytes\n(more detail)")

    executor_end, worker_end = multiprocessing.Pipe()
    step = ExecuteStep(encode_step(SchedulerOutput((), (), frozenset())))
    executor_end.send_bytes(pickle.dumps(step))
    serve(FailingRunner(), 1, worker_end)  # type: ignore[arg-type]
    reply = executor_end.recv()
    assert isinstance(reply, WorkerFailed)
    assert "Traceback" in reply.reason
    failed = CoreFailed.after(TensorParallelError(f"tensor-parallel worker {reply.reason}"))
    assert failed.reason == (
        "TensorParallelError: tensor-parallel worker rank 1 failed in execute: "
        "RuntimeError: could not allocate 12 bytes"
    )


# -- TP=2 engines over gloo --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_engines(tiny_model_dir: Callable[..., Path]) -> Iterator[tuple[LLM, LLM]]:
    """(TP=1, TP=2) engines of the tiny llama: 4 query heads over 2 KV heads, one KV head per rank."""
    model_dir = str(tiny_model_dir("llama"))
    tp2 = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    yield LLM(model=model_dir, **ENGINE_ARGS), tp2
    _executor(tp2).shutdown()


@pytest.mark.slow
def test_tp2_matches_tp1_with_grouped_query_attention(llama_engines: tuple[LLM, LLM]) -> None:
    tp1, tp2 = llama_engines
    _assert_same_greedy(tp2, tp1)
    # Every rank samples with the same generator state, so seeded sampling matches too.
    assert [t for t, _ in _run(tp2, SEEDED)] == [t for t, _ in _run(tp1, SEEDED)]
    # Each rank holds half the KV heads, so the same per-rank budget holds twice the blocks.
    assert tp2.info.num_blocks == 2 * tp1.info.num_blocks


@pytest.mark.slow
def test_tp2_scores_prompts_as_tp1(llama_engines: tuple[LLM, LLM]) -> None:
    # Every rank reads the same prompt rows' logits (the LM head gathers the vocabulary across ranks).
    tp1, tp2 = llama_engines
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    for got, expected in zip(tp2.generate(_prompts(), params), tp1.generate(_prompts(), params), strict=True):
        assert got.prompt_logprobs is not None and expected.prompt_logprobs is not None
        assert len(got.prompt_logprobs) == len(expected.prompt_logprobs) == len(got.prompt_token_ids)
        for a, b in zip(got.prompt_logprobs[1:], expected.prompt_logprobs[1:], strict=True):
            assert a is not None and b is not None
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [token for token, _ in a.top] == [token for token, _ in b.top]


@pytest.mark.slow
def test_killed_worker_raises_and_stops_the_others(llama_engines: tuple[LLM, LLM]) -> None:
    """Runs after the test above: it kills a worker of the shared TP=2 engine."""
    executor = _executor(llama_engines[1])
    rank0_pid, rank1_pid = executor.worker_pids
    assert rank0_pid is not None and rank1_pid is not None
    os.kill(rank1_pid, signal.SIGKILL)
    with pytest.raises(TensorParallelError, match=rf"worker rank 1 \(pid {rank1_pid}\) exited with code -9"):
        llama_engines[1].generate(_prompts(), GREEDY)
    assert not _pid_alive(rank0_pid)  # the survivor was stopped, not left blocked in a collective
    with pytest.raises(TensorParallelError, match="rank 1"):
        llama_engines[1].generate(_prompts(), GREEDY)


@pytest.fixture(scope="module")
def qwen3_one_kv_head_engines(tiny_model_dir: Callable[..., Path]) -> Iterator[tuple[LLM, LLM]]:
    """(TP=1, TP=2) engines of a tiny qwen3 with one KV head: replicated on both ranks."""
    model_dir = str(tiny_model_dir("qwen3", num_key_value_heads=1))
    tp2 = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    yield LLM(model=model_dir, **ENGINE_ARGS), tp2
    _executor(tp2).shutdown()


@pytest.mark.slow
def test_tp2_matches_tp1_with_fewer_kv_heads_than_ranks(qwen3_one_kv_head_engines: tuple[LLM, LLM]) -> None:
    tp1, tp2 = qwen3_one_kv_head_engines
    _assert_same_greedy(tp2, tp1)
    assert tp2.info.num_blocks == tp1.info.num_blocks


@pytest.mark.slow
def test_interrupted_step_retires_the_workers(
    qwen3_one_kv_head_engines: tuple[LLM, LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs after the test above. A Ctrl-C while replies are outstanding leaves the ranks out of step:
    the executor must stop them rather than pair the next step with this step's late replies."""
    executor = _executor(qwen3_one_kv_head_engines[1])
    pids = executor.worker_pids

    def interrupted() -> list[Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "_collect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qwen3_one_kv_head_engines[1].generate(_prompts(), GREEDY)
    monkeypatch.undo()
    with pytest.raises(TensorParallelError, match="'execute' call to the workers was interrupted"):
        qwen3_one_kv_head_engines[1].generate(_prompts(), GREEDY)
    assert not any(pid is not None and _pid_alive(pid) for pid in pids)


@pytest.mark.slow
def test_interrupted_start_stops_the_workers(
    tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the ranks load: the workers stop at once, not when the executor is collected (a
    traceback kept for display, as here in excinfo, keeps it alive)."""
    import batchlm.executor.tensor_parallel as tensor_parallel

    spawned: list[Any] = []
    spawn = tensor_parallel._spawn_workers

    def spawn_and_keep(*args: Any) -> Any:
        processes, conns, news = spawn(*args)
        spawned.extend(processes)
        return processes, conns, news

    def interrupted(self: TensorParallelExecutor) -> list[Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(tensor_parallel, "_spawn_workers", spawn_and_keep)
    monkeypatch.setattr(TensorParallelExecutor, "_collect", interrupted)
    config = EngineConfig(model=str(tiny_model_dir("llama")), tensor_parallel_size=2, **ENGINE_ARGS)
    with pytest.raises(KeyboardInterrupt) as excinfo:
        TensorParallelExecutor(config, Path(config.model))
    executor = excinfo.traceback[-1].frame.f_locals["self"]
    assert len(spawned) == 2 and not any(process.is_alive() for process in spawned)
    with pytest.raises(TensorParallelError, match="start-up was interrupted"):
        executor.check_health()


@pytest.mark.slow
def test_worker_start_failure_names_the_rank_and_the_problem(tmp_path: Path) -> None:
    config = EngineConfig(model=str(tmp_path), tensor_parallel_size=2, **ENGINE_ARGS)
    with pytest.raises(
        TensorParallelError, match=r"rank \d failed to start: ValueError: .* has no config.json"
    ) as failure:
        build_tensor_parallel_executor(config, tmp_path)
    # A configuration refused by a rank is a ValueError too: `batchlm generate` reports it in one line.
    assert isinstance(failure.value, ValueError)


@pytest.mark.slow
def test_a_size_that_does_not_split_the_heads_is_one_error_line(
    tiny_model_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from batchlm.cli import main

    model = str(tiny_model_dir("llama"))  # 4 query heads: 3 ranks cannot share them
    assert main(["generate", "--model", model, "--device", "cpu", "--tensor-parallel-size", "3", "hi"]) == 2
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]  # after the fixture's progress lines
    assert last.startswith("batchlm generate: tensor-parallel worker rank") and "Traceback" not in error
    assert "tensor-parallel size 3" in last


# -- behind the server -----------------------------------------------------------------------------


def _spawned_children_of(pid: int) -> list[int]:
    """Processes `pid` started with multiprocessing's spawn (not its resource tracker), by pid."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == pid and b"spawn_main" in command:
            children.append(int(stat.parent.name))
    return sorted(children)


@pytest.fixture()
def tp2_server(tiny_model_dir: Callable[..., Path]) -> Iterator[BackgroundServer]:
    config = EngineConfig(model=str(tiny_model_dir("llama")), tensor_parallel_size=2, **ENGINE_ARGS)
    engine = AsyncLLMEngine(config, multiprocess=True)
    running = BackgroundServer(engine, ServerSettings(), start_engine=engine.start).start()
    running.wait_until_ready(180)
    yield running
    running.stop()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_server_dead_worker_fails_in_flight_and_health(tp2_server: BackgroundServer) -> None:
    engine = tp2_server.engine
    assert isinstance(engine, AsyncLLMEngine) and engine._worker is not None
    core_pid = engine._worker.pid  # type: ignore[union-attr]
    assert core_pid is not None
    workers = _spawned_children_of(core_pid)
    assert len(workers) == 2
    url = f"{tp2_server.base_url}/v1/completions"
    body = {
        "model": engine.model_info.served_model_name,
        "prompt": "a long story",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    events = []
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 2:
                    os.kill(workers[-1], signal.SIGKILL)
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "tensor-parallel worker rank" in events[-2]
    assert sum('"text"' in event for event in events) < 400  # it ended early, with the error
    wait_until(lambda: engine.is_dead, 30, "the engine to be seen dead")
    assert httpx.get(f"{tp2_server.base_url}/health").status_code == 503
    wait_until(lambda: not any(_pid_alive(pid) for pid in workers), 30, "the workers to be gone")
