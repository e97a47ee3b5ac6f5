"""TensorParallelGroup: the single-rank no-op, argument checks, and a real 2-process gloo model run."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup, shard_range


def test_single_rank_collectives_return_the_input() -> None:
    x = torch.randn(3, 4)
    assert SINGLE_RANK.all_reduce(x) is x
    assert SINGLE_RANK.all_gather(x, dim=0) is x
    assert SINGLE_RANK.is_single


def test_rank_must_lie_in_the_group() -> None:
    with pytest.raises(ValueError, match="invalid tensor-parallel rank 2 for group size 2"):
        TensorParallelGroup(2, 2)


def test_from_distributed_needs_an_initialised_job() -> None:
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        TensorParallelGroup.from_distributed()


def test_shard_range() -> None:
    assert shard_range(12, TensorParallelGroup(2, 3)) == (8, 12)
    with pytest.raises(ValueError, match="10 is not divisible by the tensor-parallel size 3"):
        shard_range(10, TensorParallelGroup(0, 3))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gloo_rank(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    """One rank of a TP=2 job: load its shard, decode greedily, save what it produced."""
    import torch.distributed as dist

    from batchlm.models.loader import load_model
    from models_harness import greedy_generate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        group = TensorParallelGroup.from_distributed()
        loaded = load_model(Path(model_dir), torch.float32, torch.device("cpu"), tp=group, progress=False)
        tokens, logprobs = greedy_generate(loaded, [5, 17, 42, 99, 3, 250, 7], 6)
        torch.save({"tokens": tokens, "logprobs": logprobs}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_two_process_model_matches_single_rank(tmp_path: Path) -> None:
    from batchlm.models.loader import load_model
    from batchlm.models.random_model import write_random_model
    from models_harness import greedy_generate

    model_dir = write_random_model(tmp_path / "model", "qwen3", {"num_key_value_heads": 1}, seed=30)
    mp.spawn(_gloo_rank, args=(_free_port(), str(model_dir), str(tmp_path)), nprocs=2, join=True)
    single = load_model(model_dir, torch.float32, torch.device("cpu"), progress=False)
    tokens, logprobs = greedy_generate(single, [5, 17, 42, 99, 3, 250, 7], 6)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["tokens"] == tokens
        torch.testing.assert_close(result["logprobs"], logprobs, atol=1e-5, rtol=0)
