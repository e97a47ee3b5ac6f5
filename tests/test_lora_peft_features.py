"""What a PEFT adapter saves beside a linear layer's lora_A and lora_B, merged as PEFT merges it:
DoRA's magnitudes (under tensor parallelism too), an embedding's factors, whole modules
(modules_to_save), trained token rows and trained biases; and such tensors that do not fit the model,
refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.models.loader import load_model
from batchlm.models.random_model import write_random_model
from lora_harness import (
    ALPHA,
    CPU,
    RANK,
    TARGETS,
    add_tensors,
    assert_generates_as,
    load,
    merged_hf,
    write_adapter,
)
from models_harness import greedy_generate, run_ranks, thread_groups


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("base"), "llama", seed=20)


def test_dora_merges_as_peft_does(base_dir: Path, tmp_path: Path) -> None:
    # DoRA: W' = m * (W + s B A) / ||W + s B A||, the norm taken over each output row.
    pairs = write_adapter(tmp_path, config={"use_dora": True})
    gen = torch.Generator().manual_seed(7)
    magnitudes = {module: torch.rand(out, generator=gen) + 0.5 for module, (out, _) in TARGETS.items()}
    add_tensors(tmp_path, {f"base_model.model.{m}.lora_magnitude_vector": v for m, v in magnitudes.items()})
    hf = merged_hf(base_dir, pairs)
    with torch.no_grad():
        for module, magnitude in magnitudes.items():
            weight = hf.get_submodule(module).weight
            weight *= (magnitude / weight.norm(dim=1))[:, None]
    assert_generates_as(load(base_dir, tmp_path), hf)


def test_dora_adapter_under_tensor_parallelism(base_dir: Path, tmp_path: Path) -> None:
    # DoRA's row norms span the whole weight: the merge must precede the split into rank shares.
    write_adapter(tmp_path, config={"use_dora": True, "modules_to_save": ["lm_head"]})
    gen = torch.Generator().manual_seed(8)
    extra = {
        f"base_model.model.{m}.lora_magnitude_vector": torch.rand(out, generator=gen) + 0.5
        for m, (out, _) in TARGETS.items()
    }
    extra["base_model.model.lm_head.weight"] = torch.randn(320, 64, generator=gen) * 0.2
    add_tensors(tmp_path, extra)
    tokens, logprobs = greedy_generate(load(base_dir, tmp_path), [5, 17, 42, 99], 8)
    groups = thread_groups(2)
    ranks = [
        load_model(base_dir, torch.float32, CPU, adapter_path=str(tmp_path), progress=False, tp=group)
        for group in groups
    ]
    for rank_tokens, rank_logprobs in run_ranks(
        lambda rank: greedy_generate(ranks[rank], [5, 17, 42, 99], 8), 2
    ):
        assert rank_tokens == tokens
        torch.testing.assert_close(rank_logprobs, logprobs, atol=1e-4, rtol=0)


def test_dora_magnitudes_are_checked(base_dir: Path, tmp_path: Path) -> None:
    module = "model.layers.0.self_attn.v_proj"
    write_adapter(tmp_path, {module: TARGETS[module]})
    add_tensors(tmp_path, {f"base_model.model.{module}.lora_magnitude_vector": torch.ones(32)})
    with pytest.raises(ValueError, match=r"v_proj has a DoRA lora_magnitude_vector but use_dora is not set"):
        load(base_dir, tmp_path)
    write_adapter(tmp_path, {module: TARGETS[module]}, {"use_dora": True})
    add_tensors(tmp_path, {f"base_model.model.{module}.lora_magnitude_vector": torch.ones(64)})
    with pytest.raises(ValueError, match=r"v_proj's lora_magnitude_vector is \[64\]; DoRA .* is \[32\]"):
        load(base_dir, tmp_path)


def test_embedding_lora_merges_as_peft_does(base_dir: Path, tmp_path: Path) -> None:
    # PEFT keeps an embedding's factors as lora_embedding_A [r, vocab] and lora_embedding_B
    # [hidden, r]; its delta is (B @ A).T.
    module = "model.layers.0.self_attn.q_proj"
    pairs = write_adapter(tmp_path, {module: TARGETS[module]})
    gen = torch.Generator().manual_seed(3)
    emb_a, emb_b = torch.randn(RANK, 320, generator=gen) * 0.3, torch.randn(64, RANK, generator=gen) * 0.3
    prefix = "base_model.model.model.embed_tokens"
    add_tensors(tmp_path, {f"{prefix}.lora_embedding_A": emb_a, f"{prefix}.lora_embedding_B": emb_b})
    hf = merged_hf(base_dir, pairs)
    with torch.no_grad():
        hf.model.embed_tokens.weight += ALPHA / RANK * (emb_b @ emb_a).T
    assert_generates_as(load(base_dir, tmp_path), hf)


def test_modules_to_save_replace_the_checkpoints_tensors(base_dir: Path, tmp_path: Path) -> None:
    # PEFT saves a module of modules_to_save whole, as base_model.model.<module>.weight.
    module = "model.layers.0.self_attn.q_proj"
    pairs = write_adapter(
        tmp_path, {module: TARGETS[module]}, {"modules_to_save": ["lm_head", "embed_tokens"]}
    )
    gen = torch.Generator().manual_seed(4)
    head, embed = torch.randn(320, 64, generator=gen) * 0.2, torch.randn(320, 64, generator=gen)
    add_tensors(
        tmp_path,
        {"base_model.model.lm_head.weight": head, "base_model.model.model.embed_tokens.weight": embed},
    )
    hf = merged_hf(base_dir, pairs)
    with torch.no_grad():
        hf.lm_head.weight.copy_(head)
        hf.model.embed_tokens.weight.copy_(embed)
    assert_generates_as(load(base_dir, tmp_path), hf)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "indices", [[3, 5, 17, 250], {"embed_tokens": [3, 5, 17, 250]}], ids=["list", "dict"]
)
def test_trainable_token_rows_replace_the_embeddings(tmp_path: Path, tied: bool, indices: Any) -> None:
    # trainable_token_indices: PEFT saves the new rows as <embedding>.token_adapter.trainable_tokens_delta
    # and writes them over the embedding's (and, tied, the head's: the same tensor).
    base = write_random_model(tmp_path / "base", "llama", {"tie_word_embeddings": tied}, seed=23)
    module = "model.layers.0.self_attn.q_proj"
    pairs = write_adapter(
        tmp_path / "adapter", {module: TARGETS[module]}, {"trainable_token_indices": indices}
    )
    new_rows = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    add_tensors(tmp_path / "adapter", {key: new_rows})
    hf = merged_hf(base, pairs)
    with torch.no_grad():
        hf.model.embed_tokens.weight[[3, 5, 17, 250]] = new_rows
    assert_generates_as(load(base, tmp_path / "adapter"), hf)


def test_trainable_token_rows_must_match_their_indices(base_dir: Path, tmp_path: Path) -> None:
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    write_adapter(tmp_path, config={"trainable_token_indices": [3, 5]})
    add_tensors(tmp_path, {key: torch.zeros(3, 64)})
    with pytest.raises(ValueError, match=r"embed_tokens has \[3, 64\] trained rows for 2 token ids"):
        load(base_dir, tmp_path)
    write_adapter(tmp_path, config={"trainable_token_indices": {"lm_head": [3, 5]}})
    add_tensors(tmp_path, {key: torch.zeros(2, 64)})
    with pytest.raises(
        ValueError, match=r"trainable_token_indices gives no list of token ids for model\.embed_tokens"
    ):
        load(base_dir, tmp_path)
    write_adapter(tmp_path, config={"trainable_token_indices": [3, 400]})
    add_tensors(tmp_path, {key: torch.zeros(2, 64)})
    with pytest.raises(
        ValueError, match=r"embed_tokens.weight is \[320, 64\] but the adapter trains rows \[3, 400\]"
    ):
        load(base_dir, tmp_path)


def test_trained_biases_replace_the_checkpoints(tmp_path: Path) -> None:
    # bias="all"/"lora_only": PEFT saves an adapted layer's bias as <module>.base_layer.bias and
    # (with "all") another layer's as <module>.bias.
    base = write_random_model(tmp_path / "base", "qwen2", seed=22)
    module = "model.layers.0.self_attn.q_proj"
    pairs = write_adapter(tmp_path / "adapter", {module: TARGETS[module]}, {"bias": "all"})
    gen = torch.Generator().manual_seed(5)
    q_bias, v_bias = torch.randn(64, generator=gen), torch.randn(32, generator=gen)
    add_tensors(
        tmp_path / "adapter",
        {
            f"base_model.model.{module}.base_layer.bias": q_bias,
            "base_model.model.model.layers.1.self_attn.v_proj.bias": v_bias,
        },
    )
    hf = merged_hf(base, pairs)
    with torch.no_grad():
        hf.get_submodule(module).bias.copy_(q_bias)
        hf.model.layers[1].self_attn.v_proj.bias.copy_(v_bias)
    assert_generates_as(load(base, tmp_path / "adapter"), hf)


def test_bias_for_a_layer_without_one_is_refused(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path, config={"bias": "all"})
    add_tensors(
        tmp_path, {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": torch.ones(64)}
    )
    with pytest.raises(
        ValueError, match=r"module\(s\) the model lacks: model.layers.0.self_attn.q_proj.bias"
    ):
        load(base_dir, tmp_path)


@pytest.mark.parametrize(
    ("targets", "extra", "named"),
    [
        ({"lm_head": (320, 64)}, {}, "lm_head"),
        ({}, {"model.embed_tokens.lora_embedding_A": torch.zeros(RANK, 320),
              "model.embed_tokens.lora_embedding_B": torch.zeros(64, RANK)}, "embed_tokens"),
        ({}, {"model.embed_tokens.weight": torch.zeros(320, 64)}, "embed_tokens"),
    ],
    ids=["lm-head-lora", "embedding-lora", "saved-embedding"],
)  # fmt: skip
def test_adapting_tied_embeddings_is_refused(
    tmp_path: Path, targets: dict, extra: dict[str, torch.Tensor], named: str
) -> None:
    # One tensor serves both ends there; PEFT changes one of them only.
    base = write_random_model(tmp_path / "base", "llama", {"tie_word_embeddings": True})
    write_adapter(tmp_path / "adapter", {**targets, "model.layers.0.self_attn.q_proj": (64, 64)})
    add_tensors(tmp_path / "adapter", {f"base_model.model.{k}": v for k, v in extra.items()})
    with pytest.raises(ValueError, match=f"adapting {named} of a model with tied embeddings"):
        load(base, tmp_path / "adapter")
