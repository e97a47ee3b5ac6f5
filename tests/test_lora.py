"""PEFT LoRA adapters merged at load: W + scale * B @ A per target, and clear refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.random_model import write_random_model
from models_harness import Chunk, greedy_generate, hf_greedy, make_kv_caches, run_step

CPU = torch.device("cpu")
RANK, ALPHA = 4, 8
# HF module name -> (out_features, in_features) in the tiny Llama (hidden 64, 4 x 16 q, 2 x 16 kv, mlp 128).
TARGETS = {
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.self_attn.v_proj": (32, 64),
    "model.layers.1.mlp.gate_proj": (128, 64),
    "model.layers.1.mlp.down_proj": (64, 128),
}


def write_adapter(
    path: Path,
    targets: dict[str, tuple[int, int]] = TARGETS,
    config: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT-format adapter on disk; returns {module: (A, B)}."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    for module, (out_features, in_features) in targets.items():
        a = torch.randn(RANK, in_features, generator=gen) * 0.3
        b = torch.randn(out_features, RANK, generator=gen) * 0.3
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        pairs[module] = (a, b)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets}),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        **(config or {}),
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return pairs


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("base"), "llama", seed=20)


def _load(path: Path, adapter: Path | None = None) -> LoadedModel:
    return load_model(
        path, torch.float32, CPU, adapter_path=str(adapter) if adapter else None, progress=False
    )


def _base_tensor(base_dir: Path, module: str) -> torch.Tensor:
    return load_file(str(base_dir / "model.safetensors"))[f"{module}.weight"]


def test_merged_weights_equal_base_plus_scaled_delta(base_dir: Path, tmp_path: Path) -> None:
    pairs = write_adapter(tmp_path)
    loaded = _load(base_dir, tmp_path)
    scale = ALPHA / RANK

    def expected(module: str) -> torch.Tensor:
        a, b = pairs[module]
        return _base_tensor(base_dir, module) + scale * b @ a

    qkv = loaded.model.model.layers[0].self_attn.qkv_proj.weight
    torch.testing.assert_close(qkv[:64], expected("model.layers.0.self_attn.q_proj"))
    torch.testing.assert_close(
        qkv[64:96], _base_tensor(base_dir, "model.layers.0.self_attn.k_proj"), rtol=0, atol=0
    )
    torch.testing.assert_close(qkv[96:], expected("model.layers.0.self_attn.v_proj"))
    mlp = loaded.model.model.layers[1].mlp
    torch.testing.assert_close(mlp.gate_up_proj.weight[:128], expected("model.layers.1.mlp.gate_proj"))
    torch.testing.assert_close(
        mlp.gate_up_proj.weight[128:], _base_tensor(base_dir, "model.layers.1.mlp.up_proj"), rtol=0, atol=0
    )
    torch.testing.assert_close(mlp.down_proj.weight, expected("model.layers.1.mlp.down_proj"))


def test_rslora_scales_by_alpha_over_sqrt_rank(base_dir: Path, tmp_path: Path) -> None:
    module = "model.layers.1.mlp.down_proj"
    pairs = write_adapter(tmp_path, {module: TARGETS[module]}, {"use_rslora": True})
    loaded = _load(base_dir, tmp_path)
    a, b = pairs[module]
    expected = _base_tensor(base_dir, module) + ALPHA / math.sqrt(RANK) * b @ a
    torch.testing.assert_close(loaded.model.model.layers[1].mlp.down_proj.weight, expected)


def test_adapted_model_matches_transformers_with_merged_weights(base_dir: Path, tmp_path: Path) -> None:
    pairs = write_adapter(tmp_path)
    adapted, base = _load(base_dir, tmp_path), _load(base_dir)
    prompt = [5, 17, 42, 99, 3, 250, 7]
    logits = [run_step(m.model, make_kv_caches(m, 2), [Chunk(prompt, 0, [0, 1])]) for m in (adapted, base)]
    assert not torch.allclose(logits[0], logits[1], atol=1e-2)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    ours, our_logprobs = greedy_generate(adapted, prompt, 12)
    theirs, their_logprobs = hf_greedy(hf, prompt, 12)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=1e-4, rtol=0)


def test_adapter_for_a_module_the_model_lacks(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path, {"model.layers.7.self_attn.q_proj": (64, 64)})
    with pytest.raises(ValueError, match=r"does not match the base model.*model.layers.7.self_attn.q_proj"):
        _load(base_dir, tmp_path)


def test_adapter_with_mismatched_shapes(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path, {"model.layers.0.self_attn.q_proj": (64, 48)})
    with pytest.raises(
        ValueError, match=r"does not match the base model.*q_proj.weight is \[64, 64\].*\[64, 48\]"
    ):
        _load(base_dir, tmp_path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "trains biases"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        # PEFT writes an alpha_pattern beside the expert parameters it adapts: the parameters are what to name.
        (
            {"target_parameters": ["gate_up_proj"], "alpha_pattern": {".*gate_up_proj": 16}},
            "target_parameters",
        ),
        ({"peft_type": "IA3"}, "IA3 adapter; only LoRA"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5, 6]}, "activated LoRA"),
    ],
)
def test_unsupported_adapter_features_are_named(
    base_dir: Path, tmp_path: Path, config: dict, message: str
) -> None:
    write_adapter(tmp_path, config=config)
    with pytest.raises(ValueError, match=message):
        _load(base_dir, tmp_path)


def test_embedding_lora_tensors_are_refused(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(RANK, 320)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(
        ValueError, match=r"unsupported tensor 'base_model.model.model.embed_tokens.lora_embedding_A'"
    ):
        _load(base_dir, tmp_path)


def test_lm_head_adapter_on_tied_embeddings_is_refused(tmp_path: Path) -> None:
    base = write_random_model(tmp_path / "base", "llama", {"tie_word_embeddings": True})
    write_adapter(tmp_path / "adapter", {"lm_head": (320, 64)})
    with pytest.raises(ValueError, match="lm_head of a model with tied embeddings"):
        _load(base, tmp_path / "adapter")


def test_adapter_directory_problems(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing is not a directory"):
        _load(base_dir, tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no adapter_config\.json"):
        _load(base_dir, tmp_path)
    write_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(
        ValueError, match=r"only adapter_model\.bin; batchlm needs adapter_model\.safetensors"
    ):
        _load(base_dir, tmp_path)


def test_module_without_its_b_matrix(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="v_proj lacks its lora_A or lora_B"):
        _load(base_dir, tmp_path)


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ("{not json", r"adapter_config\.json is not valid JSON"),
        ("[4, 8]", r"adapter_config\.json must hold a JSON object"),
        (json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}), r"q_proj has rank 4 but adapter_config\.json says r=8"),
        (json.dumps({"peft_type": "LORA", "r": 4, "rank_pattern": {"self_attn\\.q_proj": 2}}),
         r"q_proj has rank 4 but adapter_config\.json says rank_pattern\['self_attn\\\\.q_proj'\]=2"),
        (json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": "sixteen"}), r"lora_alpha must be a number, got 'sixteen'"),
        (json.dumps({"peft_type": "LORA", "r": 0}), r"r must be a positive integer, got 0"),
        (json.dumps({"peft_type": "LORA", "r": 4, "alpha_pattern": {"q_proj(": 2}}), r"alpha_pattern key 'q_proj\(' is not a regex"),
    ],
    ids=["invalid-json", "not-an-object", "rank-differs-from-r", "rank-differs-from-rank-pattern", "alpha-not-a-number",
         "zero-rank", "pattern-not-a-regex"],
)  # fmt: skip
def test_adapter_config_problems_are_named(
    base_dir: Path, tmp_path: Path, config_text: str, message: str
) -> None:
    write_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(config_text)
    with pytest.raises(ValueError, match=message):
        _load(base_dir, tmp_path)


def test_rank_pattern_ranks_are_accepted(base_dir: Path, tmp_path: Path) -> None:
    # PEFT's rank_pattern gives some modules another rank than r: the adapter is valid.
    patterns = {"q_proj": RANK, "v_proj": RANK, "mlp\\..*_proj": RANK}
    pairs = write_adapter(tmp_path, config={"r": 16, "lora_alpha": 8, "rank_pattern": patterns})
    loaded = _load(base_dir, tmp_path)
    module = "model.layers.1.mlp.down_proj"
    a, b = pairs[module]
    expected = _base_tensor(base_dir, module) + ALPHA / RANK * b @ a
    torch.testing.assert_close(loaded.model.model.layers[1].mlp.down_proj.weight, expected)


def test_alpha_pattern_scales_the_modules_it_names(base_dir: Path, tmp_path: Path) -> None:
    pairs = write_adapter(tmp_path, config={"alpha_pattern": {"self_attn.v_proj": 32}})
    loaded = _load(base_dir, tmp_path)
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj.weight
    for module, rows, alpha in (("q_proj", slice(0, 64), ALPHA), ("v_proj", slice(96, 128), 32)):
        name = f"model.layers.0.self_attn.{module}"
        a, b = pairs[name]
        torch.testing.assert_close(qkv[rows], _base_tensor(base_dir, name) + alpha / RANK * b @ a)


def test_lm_head_adapter_with_its_saved_base_layer(base_dir: Path, tmp_path: Path) -> None:
    # PEFT saves an adapted lm_head's base weight beside its lora_A/lora_B (save_embedding_layers).
    pairs = write_adapter(tmp_path, {"lm_head": (320, 64)})
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    base = _base_tensor(base_dir, "lm_head")
    tensors["base_model.model.lm_head.base_layer.weight"] = base
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    a, b = pairs["lm_head"]
    torch.testing.assert_close(_load(base_dir, tmp_path).model.lm_head.weight, base + ALPHA / RANK * b @ a)
    tensors["base_model.model.lm_head.base_layer.weight"] = torch.zeros(330, 64)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"copy of lm_head.weight is \[330, 64\].*resized vocabulary"):
        _load(base_dir, tmp_path)


def test_phi3_adapter_on_fused_projections_matches_transformers(tmp_path: Path) -> None:
    # Phi-3 checkpoints (and transformers' Phi-3) fuse q/k/v and gate/up: PEFT adapters target those names.
    base = write_random_model(tmp_path / "base", "phi3", {"pad_token_id": 0}, seed=21)
    targets = {
        "model.layers.0.self_attn.qkv_proj": (64 + 2 * 32, 64),
        "model.layers.1.mlp.gate_up_proj": (2 * 128, 64),
        "model.layers.1.self_attn.o_proj": (64, 64),
    }
    pairs = write_adapter(tmp_path / "adapter", targets)
    adapted = _load(base, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    prompt = [5, 17, 42, 99, 3, 250, 7]
    ours, our_logprobs = greedy_generate(adapted, prompt, 12)
    theirs, their_logprobs = hf_greedy(hf, prompt, 12)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=1e-4, rtol=0)
    _, base_logprobs = greedy_generate(_load(base), prompt, 12)
    assert not torch.allclose(base_logprobs, our_logprobs, atol=1e-2)  # the adapter took effect
