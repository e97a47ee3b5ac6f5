"""PEFT LoRA adapters merged at load: W + scale * B @ A per target (alpha / r, rsLoRA's
alpha / sqrt(r), PEFT's default alpha, rank and alpha patterns), the adapted model generating as
transformers' does, fused and multimodal modules named as their checkpoints name them, and an
adapter saved pickled or named under ~."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from batchlm.models.loader import load_model
from batchlm.models.random_model import TINY_CONFIG, write_random_model
from lora_harness import (
    ALPHA,
    CPU,
    RANK,
    TARGETS,
    add_tensors,
    assert_generates_as,
    base_tensor,
    load,
    write_adapter,
)
from models_harness import (
    Chunk,
    assert_greedy_matches_hf,
    greedy_generate,
    hf_gemma3_multimodal,
    hf_greedy,
    make_kv_caches,
    run_step,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("base"), "llama", seed=20)


def test_merged_weights_equal_base_plus_scaled_delta(base_dir: Path, tmp_path: Path) -> None:
    pairs = write_adapter(tmp_path)
    loaded = load(base_dir, tmp_path)
    scale = ALPHA / RANK

    def expected(module: str) -> torch.Tensor:
        a, b = pairs[module]
        return base_tensor(base_dir, module) + scale * b @ a

    qkv = loaded.model.model.layers[0].self_attn.qkv_proj.weight
    torch.testing.assert_close(qkv[:64], expected("model.layers.0.self_attn.q_proj"))
    torch.testing.assert_close(
        qkv[64:96], base_tensor(base_dir, "model.layers.0.self_attn.k_proj"), rtol=0, atol=0
    )
    torch.testing.assert_close(qkv[96:], expected("model.layers.0.self_attn.v_proj"))
    mlp = loaded.model.model.layers[1].mlp
    torch.testing.assert_close(mlp.gate_up_proj.weight[:128], expected("model.layers.1.mlp.gate_proj"))
    torch.testing.assert_close(
        mlp.gate_up_proj.weight[128:], base_tensor(base_dir, "model.layers.1.mlp.up_proj"), rtol=0, atol=0
    )
    torch.testing.assert_close(mlp.down_proj.weight, expected("model.layers.1.mlp.down_proj"))


def test_rslora_scales_by_alpha_over_sqrt_rank(base_dir: Path, tmp_path: Path) -> None:
    module = "model.layers.1.mlp.down_proj"
    pairs = write_adapter(tmp_path, {module: TARGETS[module]}, {"use_rslora": True})
    loaded = load(base_dir, tmp_path)
    a, b = pairs[module]
    expected = base_tensor(base_dir, module) + ALPHA / math.sqrt(RANK) * b @ a
    torch.testing.assert_close(loaded.model.model.layers[1].mlp.down_proj.weight, expected)


def test_adapted_model_matches_transformers_with_merged_weights(base_dir: Path, tmp_path: Path) -> None:
    pairs = write_adapter(tmp_path)
    adapted, base = load(base_dir, tmp_path), load(base_dir)
    prompt = [5, 17, 42, 99, 3, 250, 7]
    logits = [run_step(m.model, make_kv_caches(m, 2), [Chunk(prompt, 0, [0, 1])]) for m in (adapted, base)]
    assert not torch.allclose(logits[0], logits[1], atol=1e-2)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    assert_greedy_matches_hf(adapted, hf, [prompt], 12)


def test_adapter_path_expands_the_home_directory(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_adapter(tmp_path / "lora")
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = load(base_dir, tmp_path / "lora").model.model.layers[1].mlp.down_proj.weight
    loaded = load_model(base_dir, torch.float32, CPU, adapter_path="~/lora", progress=False)
    torch.testing.assert_close(loaded.model.model.layers[1].mlp.down_proj.weight, expected, rtol=0, atol=0)


def test_pickled_adapter_loads_as_its_safetensors(base_dir: Path, tmp_path: Path) -> None:
    # PEFT's save_pretrained(safe_serialization=False) writes adapter_model.bin.
    write_adapter(tmp_path / "safe")
    write_adapter(tmp_path / "pickled")
    tensors = load_file(str(tmp_path / "pickled" / "adapter_model.safetensors"))
    (tmp_path / "pickled" / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "pickled" / "adapter_model.bin")
    expected = load(base_dir, tmp_path / "safe").model.model.layers[0].self_attn.qkv_proj.weight
    got = load(base_dir, tmp_path / "pickled").model.model.layers[0].self_attn.qkv_proj.weight
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_missing_lora_alpha_is_peft_default_not_r(base_dir: Path, tmp_path: Path) -> None:
    # PEFT's LoraConfig takes lora_alpha=8 whatever r is.
    module = "model.layers.1.mlp.down_proj"
    pairs = write_adapter(tmp_path, {module: TARGETS[module]})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    a, b = pairs[module]
    expected = base_tensor(base_dir, module) + 8 / RANK * b @ a
    torch.testing.assert_close(load(base_dir, tmp_path).model.model.layers[1].mlp.down_proj.weight, expected)


def test_rank_pattern_ranks_are_accepted(base_dir: Path, tmp_path: Path) -> None:
    # PEFT's rank_pattern gives some modules another rank than r: the adapter is valid.
    patterns = {"q_proj": RANK, "v_proj": RANK, "mlp\\..*_proj": RANK}
    pairs = write_adapter(tmp_path, config={"r": 16, "lora_alpha": 8, "rank_pattern": patterns})
    loaded = load(base_dir, tmp_path)
    module = "model.layers.1.mlp.down_proj"
    a, b = pairs[module]
    expected = base_tensor(base_dir, module) + ALPHA / RANK * b @ a
    torch.testing.assert_close(loaded.model.model.layers[1].mlp.down_proj.weight, expected)


def test_alpha_pattern_scales_the_modules_it_names(base_dir: Path, tmp_path: Path) -> None:
    pairs = write_adapter(tmp_path, config={"alpha_pattern": {"self_attn.v_proj": 32}})
    loaded = load(base_dir, tmp_path)
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj.weight
    for module, rows, alpha in (("q_proj", slice(0, 64), ALPHA), ("v_proj", slice(96, 128), 32)):
        name = f"model.layers.0.self_attn.{module}"
        a, b = pairs[name]
        torch.testing.assert_close(qkv[rows], base_tensor(base_dir, name) + alpha / RANK * b @ a)


def test_lm_head_adapter_with_its_saved_base_layer(base_dir: Path, tmp_path: Path) -> None:
    # PEFT saves an adapted lm_head's base weight beside its lora_A/lora_B (save_embedding_layers).
    pairs = write_adapter(tmp_path, {"lm_head": (320, 64)})
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    base = base_tensor(base_dir, "lm_head")
    tensors["base_model.model.lm_head.base_layer.weight"] = base
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    a, b = pairs["lm_head"]
    torch.testing.assert_close(load(base_dir, tmp_path).model.lm_head.weight, base + ALPHA / RANK * b @ a)
    tensors["base_model.model.lm_head.base_layer.weight"] = torch.zeros(330, 64)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"copy of lm_head.weight is \[330, 64\].*resized vocabulary"):
        load(base_dir, tmp_path)


def test_phi3_adapter_on_fused_projections_matches_transformers(tmp_path: Path) -> None:
    # Phi-3 checkpoints (and transformers' Phi-3) fuse q/k/v and gate/up: PEFT adapters target those names.
    base = write_random_model(tmp_path / "base", "phi3", {"pad_token_id": 0}, seed=21)
    targets = {
        "model.layers.0.self_attn.qkv_proj": (64 + 2 * 32, 64),
        "model.layers.1.mlp.gate_up_proj": (2 * 128, 64),
        "model.layers.1.self_attn.o_proj": (64, 64),
    }
    pairs = write_adapter(tmp_path / "adapter", targets)
    adapted = load(base, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    prompt = [5, 17, 42, 99, 3, 250, 7]
    ours, our_logprobs = greedy_generate(adapted, prompt, 12)
    theirs, their_logprobs = hf_greedy(hf, prompt, 12)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=1e-4, rtol=0)
    _, base_logprobs = greedy_generate(load(base), prompt, 12)
    assert not torch.allclose(base_logprobs, our_logprobs, atol=1e-2)  # the adapter took effect


def test_adapter_of_a_multimodal_gemma3_names_its_text_modules_as_transformers_does(tmp_path: Path) -> None:
    # PEFT names the text modules model.language_model.*; transformers writes the checkpoint with
    # language_model.model.* (as the published ones are).
    text = {**TINY_CONFIG, "num_hidden_layers": 2, "pad_token_id": 0, "tie_word_embeddings": True}
    hf = hf_gemma3_multimodal(text, seed=24)
    hf.save_pretrained(tmp_path / "base")
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in load_file(
        str(tmp_path / "base" / "model.safetensors")
    )
    targets = {
        "model.language_model.layers.0.self_attn.q_proj": (64, 64),
        "model.language_model.layers.1.mlp.down_proj": (64, 128),
    }
    pairs = write_adapter(tmp_path / "adapter", targets)
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    assert_generates_as(load(tmp_path / "base", tmp_path / "adapter"), hf)
    # An embedding is tied there too: refused under its nested name.
    write_adapter(tmp_path / "embedding", {"model.language_model.layers.0.self_attn.q_proj": (64, 64)})
    add_tensors(
        tmp_path / "embedding",
        {"base_model.model.model.language_model.embed_tokens.weight": torch.zeros(320, 64)},
    )
    with pytest.raises(ValueError, match="adapting embed_tokens of a model with tied embeddings"):
        load(tmp_path / "base", tmp_path / "embedding")
