"""How to hand each step's SchedulerOutput to tensor-parallel workers: pipes vs a torch.distributed object broadcast.

Measures the round trip of one step (driver sends, every worker rebuilds the SchedulerOutput and
acknowledges over its pipe) for 256-request steps (all decodes; or 240 decodes + 16 admitted prompts
filling an 8192-token budget), four ways:

  pipes-wire      the driver encodes once with executor/wire.py (chunks as tuples) and writes the
                  bytes to each worker's pipe (what we ship)
  pipes-pickle    the same, pickling the SchedulerOutput dataclasses as they are
  dist-broadcast  the driver joins a gloo group with the workers and calls broadcast_object_list
  pipe+broadcast  the driver pipes to rank 0, which broadcast_object_list's to the other ranks (the
                  shape an NCCL job would need: the driver is not in the GPU group)

Run: python benchmarks/tp_broadcast.py [--workers 2] [--steps 300]
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

from batchlm.core.step_io import NewRequestData, ScheduledChunk, SchedulerOutput
from batchlm.executor.wire import decode_step, encode_step
from batchlm.sampling_params import SamplingParams

MODES = ("pipes-wire", "pipes-pickle", "dist-broadcast", "pipe+broadcast")


def decode_steps(count: int, num_requests: int = 256, context: int = 1024, block_size: int = 16) -> list[Any]:
    """`count` consecutive decode steps of the same requests; each appends a block every block_size steps
    (the first step sends the whole tables, later ones only the appended blocks, as the scheduler does)."""
    steps = []
    for step in range(count):
        position = context + step
        blocks = position // block_size + 1
        sent = (position - 1) // block_size + 1 if step else 0
        chunks = tuple(
            ScheduledChunk(
                f"cmpl-{i:08x}-0",
                (1000 + i,),
                position,
                tuple(range(i * 4096 + sent, i * 4096 + blocks)),
                True,
            )
            for i in range(num_requests)
        )
        steps.append(SchedulerOutput(chunks, (), frozenset()))
    return steps


def mixed_steps(count: int, num_prefills: int = 16, prompt_len: int = 496) -> list[Any]:
    """256 requests per step at the GPU's 8192-token budget: 240 decodes plus 16 newly admitted requests
    whose whole 496-token prompts are scheduled; each step retires the previous step's 16 newcomers."""
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=256)
    prompts = [tuple(range(i, i + prompt_len)) for i in range(num_prefills)]
    decodes = decode_steps(count, 256 - num_prefills)
    steps = []
    for step in range(count):
        ids = [f"new-{step:04x}{i:04x}-0" for i in range(num_prefills)]
        new = tuple(
            NewRequestData(rid, p, (), params, None, (2,)) for rid, p in zip(ids, prompts, strict=True)
        )
        prefills = tuple(
            ScheduledChunk(rid, p, 0, tuple(range(10**6 + 32 * i, 10**6 + 32 * (i + 1))), True)
            for i, (rid, p) in enumerate(zip(ids, prompts, strict=True))
        )
        finished = (
            frozenset(f"new-{step - 1:04x}{i:04x}-0" for i in range(num_prefills)) if step else frozenset()
        )
        steps.append(SchedulerOutput(decodes[step].chunks + prefills, new, finished))
    return steps


def _join_group(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)


def _worker(mode: str, rank: int, workers: int, port: int, conn: Connection) -> None:
    """Receive steps the way `mode` delivers them and acknowledge each over the pipe."""
    import torch.distributed as dist

    in_group = mode in ("dist-broadcast", "pipe+broadcast")
    if in_group:
        group_rank = rank + 1 if mode == "dist-broadcast" else rank
        _join_group(group_rank, workers + (mode == "dist-broadcast"), port)
    while True:
        if mode == "pipes-wire":
            payload = conn.recv_bytes()
            step = decode_step(payload) if payload else None
        elif mode == "pipes-pickle" or (mode == "pipe+broadcast" and rank == 0):
            step = pickle.loads(conn.recv_bytes())
        if in_group:
            box: list[Any] = [step if mode == "pipe+broadcast" and rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            step = box[0]
        if step is None:
            break
        conn.send(("ok", None))
    if in_group:
        dist.destroy_process_group()


def _measure(
    mode: str, workers: int, steps: list[SchedulerOutput | None], port: int, store: Any
) -> list[float]:
    import torch.distributed as dist

    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe() for _ in range(workers)]
    procs = [
        context.Process(target=_worker, args=(mode, rank, workers, port, pipes[rank][1]), daemon=True)
        for rank in range(workers)
    ]
    for proc in procs:
        proc.start()
    if mode == "dist-broadcast":
        dist.init_process_group("gloo", store=store, rank=0, world_size=workers + 1)
    times = []
    for step in steps:
        started = time.perf_counter()
        if mode == "dist-broadcast":
            dist.broadcast_object_list([step], src=0)
        else:
            if mode == "pipes-wire":
                payload = encode_step(step) if step is not None else b""
            else:
                payload = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
            for parent, _ in pipes if mode.startswith("pipes") else pipes[:1]:
                parent.send_bytes(payload)
        if step is not None:
            for parent, _ in pipes:
                parent.recv()
            times.append(time.perf_counter() - started)
    for proc in procs:
        proc.join()
    if mode == "dist-broadcast":
        dist.destroy_process_group()
    return times


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    for name, steps in (
        ("decode x256", decode_steps(args.steps)),
        ("mixed x256", mixed_steps(args.steps)),
    ):
        pickled = len(pickle.dumps(steps[-1], protocol=pickle.HIGHEST_PROTOCOL))
        wire = len(encode_step(steps[-1]))
        print(f"{name}: {pickled / 1024:.0f} KiB pickled, {wire / 1024:.0f} KiB on the wire")
        for mode in MODES:
            store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
            times = _measure(mode, args.workers, [*steps, None], store.port, store)
            warm = sorted(times[10:])
            p90 = warm[int(0.9 * len(warm))]
            print(f"  {mode:15s} median {statistics.median(warm) * 1e6:7.0f} us   p90 {p90 * 1e6:7.0f} us")


if __name__ == "__main__":
    main()
