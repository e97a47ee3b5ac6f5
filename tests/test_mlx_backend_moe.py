"""The mlx backend serves Qwen3-MoE and Mixtral checkpoints (per-expert HF tensors, stacked by mlx-lm's
loader): greedy tokens through MLXEngine equal transformers' on the same tiny random models."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import batchlm.backends as backends
from batchlm.config import EngineConfig
from batchlm.sampling_params import SamplingParams
from models_harness import hf_generated

pytestmark = pytest.mark.skipif(not backends.mlx_available(), reason="mlx and mlx-lm are not installed")

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], list(range(100, 121))]
NEW_TOKENS = 12


def _transformers_tokens(model_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    for prompt in PROMPTS:
        expected.append(hf_generated(hf, prompt, NEW_TOKENS))
    return expected


async def _mlx_tokens(model_dir: Path) -> list[list[int]]:
    from batchlm.backends.mlx.engine import MLXEngine

    engine = MLXEngine(EngineConfig(model=str(model_dir), device="cpu", max_num_seqs=2))
    await engine.start()
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

    async def one(prompt: list[int], request_id: str) -> list[int]:
        tokens: list[int] = []
        async for output in engine.generate(prompt, params, request_id):
            tokens += output.outputs[0].token_ids
        return tokens

    try:
        return list(await asyncio.gather(*(one(p, f"r{i}") for i, p in enumerate(PROMPTS))))
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_moe_models_serve_transformers_tokens(tiny_model_dir: Callable[..., Path], model_type: str) -> None:
    model_dir = tiny_model_dir(model_type)
    got = asyncio.run(asyncio.wait_for(_mlx_tokens(model_dir), 120))
    assert got == _transformers_tokens(model_dir)


def test_new_config_names_are_stated_under_the_old_ones_for_mlx_lm(tmp_path: Path) -> None:
    import json

    from batchlm.backends.mlx.config_names import older_field_names

    config = {"model_type": "qwen3_moe", "num_local_experts": 64, "rope_parameters": {"rope_theta": 5e5}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert older_field_names(tmp_path) == {"rope_theta": 5e5, "num_experts": 64}
    stated = {**config, "num_experts": 64, "rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(stated))
    assert older_field_names(tmp_path) == {}
    assert older_field_names(tmp_path / "missing") == {}
