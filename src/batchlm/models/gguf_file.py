"""Read a llama.cpp GGUF file: its model config (as an HF config.json dict) and its tensors under HF
names, quantized ones kept as raw blocks. The file is parsed by gguf_reader.GGUFFile."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchlm.models.gguf_families import GEMMA_ARCHITECTURES, MIXTRAL_LAYOUT, family_config
from batchlm.models.gguf_metadata import kv_head_count, required, required_int
from batchlm.models.gguf_reader import GGUFFile, GGUFTensor, round_float32
from batchlm.models.gguf_rope import ROPE_TENSORS, rope_scaling
from batchlm.models.gguf_types import SUPPORTED_TYPES

if TYPE_CHECKING:
    import torch

    from batchlm.layers.quantization.base import LoadedWeight, QuantizedTensor

# general.architecture -> (HF model_type, HF architecture class).
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "granite": ("granite", "GraniteForCausalLM"),
    "olmo2": ("olmo2", "Olmo2ForCausalLM"),
    "smollm3": ("smollm3", "SmolLM3ForCausalLM"),
    "glm4": ("glm4", "Glm4ForCausalLM"),
    "exaone4": ("exaone4", "Exaone4ForCausalLM"),
    "seed_oss": ("seed_oss", "SeedOssForCausalLM"),
    "gpt-oss": ("gpt_oss", "GptOssForCausalLM"),
}
# Files whose q/k rows llama.cpp's converter interleaved for its RoPE (unpermute_rows undoes it).
PERMUTED_QK_ARCHITECTURES = frozenset({"llama", "granite", "smollm3"})
_LAYOUT_FAMILIES = {**GGUF_ARCHITECTURES, MIXTRAL_LAYOUT: ("mixtral", "MixtralForCausalLM")}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's four norms a layer: before and after attention, before and after the MLP.
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# A mixture-of-experts layer: the router, and each projection of every expert stacked in one tensor
# [experts, rows, cols] (the loader hands the experts on one by one, under their HF names).
_MOE_BLOCK_NAMES = {**_BLOCK_NAMES, "ffn_gate_inp": "mlp.gate"}
# Each stack's expert projection under the family's HF name (Mixtral's w1, w3, w2 are gate, up, down).
_EXPERT_STACKS_OF = {
    "qwen3moe": {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"},
    MIXTRAL_LAYOUT: {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"},
    "gpt-oss": {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"},
}
# gpt-oss's expert biases, one [experts, rows] tensor a projection, under the HF names of its stacked
# biases: llama.cpp's converter splits HF's gate_up_proj_bias (gate and up interleaved) in two, which
# iter_gguf_tensors interleaves again.
GATE_UP_BIAS, DOWN_BIAS = "gate_up_proj_bias", "down_proj_bias"
_EXPERT_BIASES_OF = {
    "gpt-oss": {"ffn_gate_exps": GATE_UP_BIAS, "ffn_up_exps": GATE_UP_BIAS, "ffn_down_exps": DOWN_BIAS},
}
# Phi-3's fused projections, as its HF checkpoints hold them too.
_PHI3_BLOCK_NAMES = {**_BLOCK_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# GLM-4's fused gate/up (and q/k/v, should a file fuse them) and its norms of the attention's and the
# MLP's outputs; ffn_norm is the norm before the MLP, HF's post_attention_layernorm as in Llama.
_GLM4_BLOCK_NAMES = {
    **_PHI3_BLOCK_NAMES,
    "post_attention_norm": "post_self_attn_layernorm",
    "post_ffw_norm": "post_mlp_layernorm",
}
# Seed-OSS's norm before the MLP (HF's post_attention_layernorm, Llama's ffn_norm), under the name
# llama.cpp gives it for this architecture.
_SEED_OSS_BLOCK_NAMES = {**_BLOCK_NAMES, "post_attention_norm": "post_attention_layernorm"}
# gpt-oss: Seed-OSS's norm names, a router, and the attention's sink logits.
_GPT_OSS_BLOCK_NAMES = {**_MOE_BLOCK_NAMES, **_SEED_OSS_BLOCK_NAMES, "attn_sinks": "self_attn.sinks"}
# Parameters HF names without a .weight (llama.cpp's converter adds one).
_BARE_PARAMETERS = frozenset({"self_attn.sinks"})
_BLOCK_NAMES_OF = {
    "gemma2": _GEMMA_BLOCK_NAMES,
    "gemma3": _GEMMA_BLOCK_NAMES,
    # OLMo 2 and EXAONE 4.0 norm the attention's and the MLP's outputs only, under Gemma's names for
    # those norms.
    "olmo2": _GEMMA_BLOCK_NAMES,
    "exaone4": _GEMMA_BLOCK_NAMES,
    "glm4": _GLM4_BLOCK_NAMES,
    "seed_oss": _SEED_OSS_BLOCK_NAMES,
    "gpt-oss": _GPT_OSS_BLOCK_NAMES,
    "phi3": _PHI3_BLOCK_NAMES,
    "qwen3moe": _MOE_BLOCK_NAMES,
    MIXTRAL_LAYOUT: _MOE_BLOCK_NAMES,
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: Path) -> GGUFFile:
    """The file memory-mapped read-only; ValueError naming it when it is not a GGUF file."""
    try:
        return GGUFFile(path)
    except OSError as err:
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from err


def gguf_layout(reader: GGUFFile) -> str:
    """How the file's tensors and config read: its architecture, or MIXTRAL_LAYOUT for a "llama"
    file with experts."""
    arch = str(reader.metadata("general.architecture", ""))
    if arch == "llama" and int(reader.metadata("llama.expert_count", 0) or 0) > 0:
        return MIXTRAL_LAYOUT
    return arch


def hf_tensor_name(gguf_name: str, layout: str = "llama") -> str:
    """The HF checkpoint name of a GGUF tensor in a file of this layout (gguf_layout); ValueError
    naming a tensor we have no place for."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    block_names = _BLOCK_NAMES_OF.get(layout, _BLOCK_NAMES)
    expert_stacks = _EXPERT_STACKS_OF.get(layout, {})
    expert_biases = _EXPERT_BIASES_OF.get(layout, {})
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part in block_names:
            module = block_names[part]
            if module in _BARE_PARAMETERS:
                return f"model.layers.{layer}.{module}"
            return f"model.layers.{layer}.{module}.{kind}"
        if part in expert_biases and kind == "bias":
            return f"model.layers.{layer}.mlp.experts.{expert_biases[part]}"
        if part in expert_stacks:
            # The stack as a whole; iter_gguf_tensors names each expert of it.
            return f"model.layers.{layer}.mlp.experts.{expert_stacks[part]}.{kind}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}: batchlm has no place for it in the model")


def check_supported(reader: GGUFFile, path: Path) -> str:
    """The file's architecture, after checking it and every tensor's type are ones we load."""
    arch = str(reader.metadata("general.architecture", ""))
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; batchlm loads {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    shards = int(reader.metadata("split.count", 1) or 1)
    if shards > 1:
        shard = int(reader.metadata("split.no", 0) or 0) + 1
        raise ValueError(
            f"{path} is shard {shard} of a GGUF file split in {shards}; batchlm loads single files: merge the "
            "shards first (llama.cpp's `llama-gguf-split --merge <first shard> <merged>.gguf`)"
        )
    if not any(tensor.name == "token_embd.weight" for tensor in reader.tensors):
        raise ValueError(f"{path}: the file has no token embedding tensor (token_embd.weight)")
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(
                f"{path}: tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, which batchlm does not "
                f"load (supported: {', '.join(sorted(SUPPORTED_TYPES))})"
            )
    layout = gguf_layout(reader)
    for tensor in weight_tensors(reader):
        hf_tensor_name(tensor.name, layout)
    return arch


def weight_tensors(reader: GGUFFile) -> list[GGUFTensor]:
    """The model's weights: every tensor but the RoPE divisors, which the config states (gguf_rope)."""
    return [tensor for tensor in reader.tensors if tensor.name not in ROPE_TENSORS]


def hf_config(reader: GGUFFile, path: Path) -> dict[str, Any]:
    """config.json for the file's model (sizes, RoPE, norm epsilon, tying, special token ids)."""
    arch = check_supported(reader, path)
    layout = gguf_layout(reader)
    model_type, architecture = _LAYOUT_FAMILIES[layout]
    heads = required_int(reader, f"{arch}.attention.head_count", path)
    hidden = required_int(reader, f"{arch}.embedding_length", path)
    embedding_rows = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": embedding_rows,
        "hidden_size": hidden,
        "intermediate_size": required_int(reader, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": required_int(reader, f"{arch}.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_head_count(reader, arch, heads, path),
        "head_dim": required_int(reader, f"{arch}.attention.key_length", path, hidden // heads),
        "max_position_embeddings": required_int(reader, f"{arch}.context_length", path),
        "rms_norm_eps": round_float32(
            required(reader, f"{arch}.attention.layer_norm_rms_epsilon", path, float)
        ),
        "rope_theta": round_float32(required(reader, f"{arch}.rope.freq_base", path, float, 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": reader.metadata("tokenizer.ggml.bos_token_id"),
        "eos_token_id": reader.metadata("tokenizer.ggml.eos_token_id"),
    }
    config.update(family_config(reader, arch, layout, config, path))
    scaling = rope_scaling(reader, arch, config["head_dim"], config["rope_theta"], path)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def tensor_types(reader: GGUFFile) -> dict[str, str]:
    """HF tensor name -> GGML type name, for choosing each layer's weight method before loading."""
    layout = gguf_layout(reader)
    return {hf_tensor_name(t.name, layout): t.tensor_type.name for t in weight_tensors(reader)}


def iter_gguf_tensors(reader: GGUFFile) -> Iterator[tuple[str, LoadedWeight]]:
    """(HF name, tensor) for every tensor: F32/F16/BF16 as dense CPU tensors, block types as
    QuantizedTensor. Llama q/k rows are put back in HF order (see unpermute_rows)."""
    arch = str(reader.metadata("general.architecture", ""))
    heads = int(reader.metadata(f"{arch}.attention.head_count", 0))
    kv_heads = kv_head_count(reader, arch, heads, reader.path)
    layout = gguf_layout(reader)
    for tensor in weight_tensors(reader):
        name = hf_tensor_name(tensor.name, layout)
        if name.endswith(f".{GATE_UP_BIAS}"):
            if tensor.name.endswith("ffn_gate_exps.bias"):  # the up bias joins it here
                yield name, _interleaved_gate_up_bias(reader, tensor)
            continue
        if name.endswith(f".{DOWN_BIAS}"):
            yield name, _dense_bias(tensor)
            continue
        if ".mlp.experts." in name:
            yield from _experts(name, tensor)
            continue
        loaded: LoadedWeight = _as_loaded(tensor)
        if arch in GEMMA_ARCHITECTURES and name.endswith("norm.weight"):
            loaded = _gemma_norm(loaded, tensor.name)
        if arch in PERMUTED_QK_ARCHITECTURES and name.endswith(("q_proj.weight", "q_proj.bias")):
            loaded = unpermute_rows(loaded, heads)
        elif arch in PERMUTED_QK_ARCHITECTURES and name.endswith(("k_proj.weight", "k_proj.bias")):
            loaded = unpermute_rows(loaded, kv_heads)
        yield name, loaded


def _experts(stack_name: str, tensor: GGUFTensor) -> Iterator[tuple[str, LoadedWeight]]:
    """Each expert's [rows, cols] slice of a stacked expert tensor, under its HF name (a view: quantized
    rows stay bytes)."""
    from batchlm.layers.quantization.base import QuantizedTensor

    stacked = _as_loaded(tensor)
    prefix, _, leaf = stack_name.rpartition(".")
    module, _, projection = prefix.rpartition(".")
    data = stacked.data if isinstance(stacked, QuantizedTensor) else stacked
    assert data.dim() == 3, f"{tensor.name}: an expert stack is [experts, rows, cols]"
    for expert in range(data.shape[0]):
        name = f"{module}.{expert}.{projection}.{leaf}"
        if isinstance(stacked, QuantizedTensor):
            yield name, replace(stacked, data=stacked.data[expert])
        else:
            yield name, stacked[expert]


def _interleaved_gate_up_bias(reader: GGUFFile, gate: GGUFTensor) -> torch.Tensor:
    """A layer's gpt-oss gate_up_proj_bias [experts, 2I] as its HF checkpoint holds it, gate and up
    alternating, from the file's gate bias and the up bias beside it (the family's loader then orders
    it as its experts' rows are: every gate, then every up)."""
    import torch

    up_name = gate.name.replace("ffn_gate_exps", "ffn_up_exps")
    up = next((t for t in reader.tensors if t.name == up_name), None)
    if up is None:
        raise ValueError(f"GGUF tensor {gate.name!r} has no {up_name!r} beside it")
    gate_bias, up_bias = _dense_bias(gate), _dense_bias(up)
    if gate_bias.shape != up_bias.shape:
        raise ValueError(f"GGUF tensors {gate.name!r} and {up_name!r} differ in shape")
    return torch.stack([gate_bias, up_bias], dim=-1).flatten(-2)


def _dense_bias(tensor: GGUFTensor) -> torch.Tensor:
    # llama.cpp keeps biases in F32; a quantized one is read dense all the same.
    import torch

    from batchlm.layers.quantization.base import as_dense

    return as_dense(_as_loaded(tensor), torch.float32).float()


def _gemma_norm(weight: LoadedWeight, name: str) -> LoadedWeight:
    """HF's Gemma norm weight: llama.cpp's converter stores it plus one (Gemma's RMSNorm scales by
    1 + weight, llama.cpp's by the weight)."""
    import torch

    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"GGUF tensor {name!r}: a block-quantized norm weight is not supported")
    return weight - 1


def _as_loaded(tensor: GGUFTensor) -> torch.Tensor | QuantizedTensor:
    # torch is imported here, not at the top: the API server reads GGUF metadata and needs no torch.
    import torch
    from gguf import GGML_QUANT_SIZES

    from batchlm.layers.quantization.base import QuantizedTensor

    qtype = tensor.tensor_type
    data = torch.from_numpy(np.array(tensor.data))  # a copy: the mapping is read-only
    if qtype.name in ("F32", "F16"):
        return data
    if qtype.name == "BF16":
        return data.view(torch.bfloat16)
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    return QuantizedTensor(qtype.name, data, int(tensor.shape[0]), block_size, block_bytes)


def unpermute_rows(loaded: LoadedWeight, num_heads: int) -> LoadedWeight:
    """Undo llama.cpp's converter, which reorders each head's q/k rows from HF's rotate-half layout
    (first halves, then second halves) to interleaved pairs for its RoPE: head h's row 2i + j holds HF
    row j * d/2 + i. Rows move whole, so quantized rows move as their bytes."""
    import torch

    from batchlm.layers.quantization.base import QuantizedTensor

    data = loaded.data if isinstance(loaded, QuantizedTensor) else loaded
    assert isinstance(data, torch.Tensor), "GGUF tensors are dense or GGML blocks"
    rows = data.shape[0]
    restored = data.reshape(num_heads, rows // num_heads // 2, 2, *data.shape[1:]).transpose(1, 2)
    restored = restored.reshape(data.shape)
    if isinstance(loaded, QuantizedTensor):
        return QuantizedTensor(loaded.qtype, restored, loaded.cols, loaded.block_size, loaded.block_bytes)
    return restored
