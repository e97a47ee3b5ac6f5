"""The engine flags' help states the values their device-chosen defaults take, and those values are
the ones the engine uses (the help is written by hand in EngineConfig's field comments)."""

from __future__ import annotations

import torch

from batchlm.config import EngineConfig
from batchlm.executor.core_builder import (
    SPECULATIVE_MAX_BATCH,
    SPECULATIVE_POOL_TOKENS,
    SPECULATIVE_TOKENS,
    resolve_speculation,
)
from batchlm.flags import field_comments
from batchlm.runner.model_runner import default_max_num_batched_tokens


def test_device_chosen_defaults_in_the_help_are_the_engines() -> None:
    help_of = field_comments(EngineConfig)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    budget = help_of["max_num_batched_tokens"]
    assert (
        f"{default_max_num_batched_tokens(cpu)} on a CPU, {default_max_num_batched_tokens(gpu)} on a GPU"
        in (budget)
    )
    drafts = help_of["num_speculative_tokens"]
    assert f"{SPECULATIVE_TOKENS['cpu']} on a CPU, {SPECULATIVE_TOKENS['cuda']} on a GPU" in drafts
    assert SPECULATIVE_MAX_BATCH["cpu"] == SPECULATIVE_MAX_BATCH["cuda"]
    assert (
        f"None = {SPECULATIVE_MAX_BATCH['cpu']} (on a CPU and on a GPU)" in help_of["speculative_max_batch"]
    )
    pool = help_of["speculative_pool_tokens"]
    assert f"{SPECULATIVE_POOL_TOKENS['cpu']} on a CPU, {SPECULATIVE_POOL_TOKENS['cuda']} on a GPU" in pool


def test_resolved_speculation_takes_the_stated_values() -> None:
    config = EngineConfig()
    for device, kind in (("cpu", "cpu"), ("cuda:0", "cuda")):
        resolved = resolve_speculation(config, device)
        assert resolved.num_tokens == SPECULATIVE_TOKENS[kind]
        assert resolved.max_batch == SPECULATIVE_MAX_BATCH[kind]
        assert resolved.pool_tokens == SPECULATIVE_POOL_TOKENS[kind]
