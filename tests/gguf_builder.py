"""Write tiny GGUF files the way llama.cpp's converter does, from random-weight HF models (tests only).

`write_tiny_gguf` makes a random model of a family (Llama, Qwen2, Qwen3, Gemma, Phi-3, Granite, OLMo 2,
SmolLM3, GLM-4, EXAONE 4.0, Seed-OSS, the MoE ones, gpt-oss) with the built-in tokenizer (demo.write_model_dir), then
writes its metadata, tokenizer and tensors with `gguf.GGUFWriter`: llama, granite and smollm3 q/k rows
permuted as llama.cpp's convert_hf_to_gguf.py does (GLM-4's stay as HF interleaves them, for llama.cpp's
interleaved RoPE), 1-D tensors in F32, matrices in the asked GGML type. Types
the gguf package can quantize are quantized from the weights; K-quants, i-quants and ternary types
(which it only reads) get random blocks with small scales, so the model is random either way and the
test compares loaders.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, RopeScalingType
from gguf.quants import quantize
from safetensors.torch import load_file

from batchlm.models.demo import write_model_dir

# Every in-dimension is a multiple of 256, the K-quants' block size.
TINY_GGUF_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
# Offsets and values of the float16 scale fields of each block type written as random blocks (d, then
# dmin where it has one): weights of std ~0.05, dmin chosen so that their mean is near zero (else
# every row looks alike). IQ1_M spreads its d over the top nibbles of its last 8 bytes (offset -1).
RANDOM_BLOCK_SCALES: dict[str, tuple[tuple[int, float], ...]] = {
    "Q2_K": ((80, 2e-3), (82, 3e-3)),
    "Q3_K": ((108, 1e-3),),
    "Q4_K": ((0, 2e-4), (2, 1.5e-3)),
    "Q5_K": ((0, 1e-4), (2, 1.55e-3)),
    "Q6_K": ((208, 2e-5),),
    "IQ1_S": ((0, 7e-3),),
    "IQ1_M": ((-1, 7e-3),),
    "IQ2_XXS": ((0, 9e-4),),
    "IQ2_XS": ((0, 9e-4),),
    "IQ2_S": ((0, 9e-4),),
    "IQ3_XXS": ((0, 3.5e-4),),
    "IQ3_S": ((0, 3.5e-4),),
    "IQ4_NL": ((0, 7e-4),),
    "IQ4_XS": ((0, 4e-5),),
    "TQ1_0": ((52, 6e-2),),
    "TQ2_0": ((64, 5e-2),),
}
# Types whose scale is given either sign (llama.cpp's IQ4 quantizers choose one), to cover both.
_SIGNED_SCALES = frozenset({"IQ4_NL", "IQ4_XS"})
_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # a mixture-of-experts layer's router
}
# Gemma's four norms a layer.
_GEMMA_HF_TO_GGUF = {
    **_HF_TO_GGUF,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Phi-3's fused projections.
_PHI3_HF_TO_GGUF = {**_HF_TO_GGUF, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
# GLM-4's fused gate/up and its norms of the attention's and the MLP's outputs.
_GLM4_HF_TO_GGUF = {
    **_PHI3_HF_TO_GGUF,
    "post_self_attn_layernorm": "post_attention_norm",
    "post_mlp_layernorm": "post_ffw_norm",
}
# Architectures whose norms of the attention's and the MLP's outputs have Gemma's GGUF names.
_POST_NORM_ARCHS = ("olmo2", "exaone4")
# Seed-OSS's norm before the MLP: the name llama.cpp's tensor map gives post_attention_layernorm for it.
_SEED_OSS_HF_TO_GGUF = {**_HF_TO_GGUF, "post_attention_layernorm": "post_attention_norm"}
# gpt-oss's: Seed-OSS's norm names, its router and its sinks.
_GPT_OSS_HF_TO_GGUF = {**_SEED_OSS_HF_TO_GGUF, "mlp.router": "ffn_gate_inp", "self_attn.sinks": "attn_sinks"}
# Architectures whose q/k rows llama.cpp's converter permutes for its interleaved RoPE.
_PERMUTED_QK = ("llama", "granite", "smollm3")
# HF model_type -> GGUF general.architecture, where they differ.
_GGUF_ARCH = {"gemma3_text": "gemma3", "qwen3_moe": "qwen3moe", "mixtral": "llama", "gpt_oss": "gpt-oss"}
# Mixtral's HF expert names, as llama.cpp's converter reads them (w1 gate, w3 up, w2 down).
_MIXTRAL_RENAMES = {
    ".block_sparse_moe.": ".mlp.",
    ".w1.": ".gate_proj.",
    ".w3.": ".up_proj.",
    ".w2.": ".down_proj.",
}


def write_tiny_gguf(
    path: Path,
    model_type: str = "llama",
    qtype: str = "F32",
    tied: bool = False,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    metadata: dict[str, int | float] | None = None,
    tensor_types: dict[str, str] | None = None,
) -> Path:
    """Write `path` (a .gguf file) and return it; the HF model it came from is in path.parent / "hf".
    metadata: more keys, an int as int32 and a float as float32 (as llama.cpp writes general.sampling).
    tensor_types: the type of the tensors whose GGUF names end with a key, instead of qtype (a
    Q4_K_M-like mix: {"attn_v.weight": "Q6_K"})."""
    hf_dir = write_model_dir(
        path.parent / "hf",
        model_type,
        {**TINY_GGUF_CONFIG, "tie_word_embeddings": tied, **(overrides or {})},
        seed,
    )
    config = json.loads((hf_dir / "config.json").read_text())
    arch = _GGUF_ARCH.get(model_type, model_type)
    writer = GGUFWriter(str(path), arch)
    _add_model_metadata(writer, arch, config)
    _add_tokenizer(writer, hf_dir)
    for key, value in (metadata or {}).items():
        (writer.add_int32 if isinstance(value, int) else writer.add_float32)(key, value)
    _add_rope_scaling(writer, config)
    rng = np.random.default_rng(seed)
    tensors = {
        _renamed(name, model_type): tensor.float().numpy()
        for name, tensor in load_file(str(hf_dir / "model.safetensors")).items()
    }
    if model_type == "gpt_oss":
        tensors = _split_like_llama_cpp(tensors)
    for name, values in sorted(_stack_experts(tensors).items()):
        gguf_name = gguf_tensor_name(name, arch)
        if arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            values = permute_like_llama_cpp(values, heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            values = values + 1  # llama.cpp's converter: its RMSNorm scales by the weight, Gemma's by 1 + it
        # llama-quantize leaves 1-D tensors, biases and a mixture-of-experts router in F32.
        kept = values.ndim == 1 or gguf_name.endswith((".bias", "ffn_gate_inp.weight"))
        chosen = next((kind for end, kind in (tensor_types or {}).items() if gguf_name.endswith(end)), qtype)
        _add_tensor(writer, gguf_name, values, "F32" if kept else chosen, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _renamed(name: str, model_type: str) -> str:
    """An HF tensor name in the gate/up/down spelling the GGUF names below are written from."""
    if model_type == "mixtral":
        for theirs, ours in _MIXTRAL_RENAMES.items():
            name = name.replace(theirs, ours)
    return name


def _split_like_llama_cpp(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """gpt-oss's tensors as llama.cpp's converter writes them: each layer's transposed gate_up_proj
    [E, H, 2I] (gate and up interleaved) as gate and up stacks [E, I, H], down_proj [E, I, H] as
    [E, H, I], the interleaved gate_up_proj_bias as two biases, and the sinks named `.weight`."""
    out: dict[str, np.ndarray] = {}
    for name, values in tensors.items():
        prefix, _, param = name.rpartition(".")
        if param == "gate_up_proj":
            rows = values.transpose(0, 2, 1)
            out[f"{prefix}.gate_proj.weight"], out[f"{prefix}.up_proj.weight"] = rows[:, ::2], rows[:, 1::2]
        elif param == "gate_up_proj_bias":
            out[f"{prefix}.gate_proj.bias"], out[f"{prefix}.up_proj.bias"] = values[:, ::2], values[:, 1::2]
        elif param == "down_proj" and prefix.endswith(".experts"):
            out[f"{prefix}.down_proj.weight"] = values.transpose(0, 2, 1)
        elif param == "down_proj_bias":
            out[f"{prefix}.down_proj.bias"] = values
        elif param == "sinks":
            out[f"{name}.weight"] = values
        else:
            out[name] = values
    return {name: np.ascontiguousarray(values) for name, values in out.items()}


def _stack_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert projections stacked as llama.cpp's converter stacks them: one [experts, rows, cols]
    tensor a layer and projection, named `...mlp.experts.<projection>.weight` here."""
    stacks: dict[str, dict[int, np.ndarray]] = {}
    others: dict[str, np.ndarray] = {}
    for name, values in tensors.items():
        match = re.fullmatch(r"(.+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if match is None:
            others[name] = values
            continue
        stacks.setdefault(f"{match[1]}.{match[3]}.weight", {})[int(match[2])] = values
    stacked = {name: np.stack([experts[e] for e in sorted(experts)]) for name, experts in stacks.items()}
    return {**others, **stacked}


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    module, _, kind = hf_name.rpartition(".")
    if module == "model.embed_tokens":
        return f"token_embd.{kind}"
    if module == "model.norm":
        return f"output_norm.{kind}"
    if module == "lm_head":
        return f"output.{kind}"
    _, _, layer, rest = module.split(".", 3)
    if rest.startswith("mlp.experts."):
        return f"blk.{layer}.ffn_{rest.removeprefix('mlp.experts.').removesuffix('_proj')}_exps.{kind}"
    names = _HF_TO_GGUF
    if arch.startswith("gemma") or arch in _POST_NORM_ARCHS:
        names = _GEMMA_HF_TO_GGUF
    elif arch in ("phi3", "glm4"):
        names = _GLM4_HF_TO_GGUF if arch == "glm4" else _PHI3_HF_TO_GGUF
    elif arch == "seed_oss":
        names = _SEED_OSS_HF_TO_GGUF
    elif arch == "gpt-oss":
        names = _GPT_OSS_HF_TO_GGUF
    return f"blk.{layer}.{names[rest]}.{kind}"


def permute_like_llama_cpp(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute: each head's rotate-half rows become interleaved pairs."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_model_metadata(writer: GGUFWriter, arch: str, config: dict[str, Any]) -> None:
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    partial = _global_rope(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(config["head_dim"] * partial))
    writer.add_rope_freq_base(_global_rope(config).get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if "num_experts" in config or "num_local_experts" in config:
        writer.add_expert_count(config.get("num_experts") or config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if "moe_intermediate_size" in config:  # Mixtral's experts are feed_forward_length wide
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if arch == "gpt-oss":  # its experts intermediate_size wide, as the converter writes them
        writer.add_expert_feed_forward_length(config["intermediate_size"])
        writer.add_sliding_window(config["sliding_window"])
    if arch.startswith("gemma") or (arch in ("phi3", "exaone4") and config.get("sliding_window")):
        writer.add_sliding_window(config["sliding_window"])
    if arch == "exaone4" and config.get("sliding_window"):  # one flag a layer, as the converter writes
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config["layer_types"]])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            writer.add_float32(f"{arch}.{key}", config[key])
    if arch == "granite":
        writer.add_embedding_scale(config["embedding_multiplier"])
        writer.add_residual_scale(config["residual_multiplier"])
        writer.add_attention_scale(config["attention_multiplier"])
        writer.add_logit_scale(config["logits_scaling"])


def _global_rope(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameters of the full-attention layers (Gemma 3's config has one entry a layer type)."""
    params: dict[str, Any] = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return params.get("full_attention", params)


def _add_rope_scaling(writer: GGUFWriter, config: dict[str, Any]) -> None:
    """Llama 3's scaling as llama.cpp's converter writes it, a divisor per frequency in `rope_freqs`;
    linear scaling as metadata."""
    scaling = _global_rope(config)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        if "beta_fast" in scaling:
            writer.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        if "beta_slow" in scaling:
            writer.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
    elif kind == "longrope":  # Phi-3's: its factors as two tensors, the original length as metadata
        writer.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], dtype=np.float32))
        original = (
            config.get("original_max_position_embeddings") or scaling["original_max_position_embeddings"]
        )
        writer.add_rope_scaling_orig_ctx_len(original)
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        divisors = []
        for i in range(0, config["head_dim"], 2):
            wavelength = 2 * math.pi * scaling.get("rope_theta", 10000.0) ** (i / config["head_dim"])
            if wavelength < original / high:
                divisors.append(1.0)
            elif wavelength > original / low:
                divisors.append(factor)
            else:
                weight = (original / wavelength - low) / (high - low)
                divisors.append(1 / ((1 - weight) / factor + weight))
        writer.add_tensor("rope_freqs.weight", np.array(divisors, dtype=np.float32))


def _add_tokenizer(writer: GGUFWriter, hf_dir: Path) -> None:
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {added["content"] for added in spec["added_tokens"] if added["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tokenizer_config["bos_token"]])
    writer.add_eos_token_id(vocab[tokenizer_config["eos_token"]])
    writer.add_eot_token_id(generation["eos_token_id"][-1])
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer_config["chat_template"])


def _add_tensor(
    writer: GGUFWriter, name: str, values: np.ndarray, qtype: str, rng: np.random.Generator
) -> None:
    if values.ndim == 3 and qtype not in ("F32", "F16"):  # an expert stack: quantized as its rows
        rows = values.reshape(-1, values.shape[-1])
        if qtype in RANDOM_BLOCK_SCALES:
            blocks = random_blocks(rows.shape, qtype, rng)
        else:
            blocks = quantize(rows, GGMLQuantizationType[qtype])
        raw = blocks.reshape(*values.shape[:2], -1)
        writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[qtype])
        return
    ggml_type = GGMLQuantizationType[qtype]
    if qtype == "F32":
        writer.add_tensor(name, values.astype(np.float32))
    elif qtype == "F16":
        writer.add_tensor(name, values.astype(np.float16))
    elif qtype in RANDOM_BLOCK_SCALES:
        writer.add_tensor(name, random_blocks(values.shape, qtype, rng), raw_dtype=ggml_type)
    else:
        writer.add_tensor(name, quantize(values, ggml_type), raw_dtype=ggml_type)


def random_blocks(shape: tuple[int, ...], qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for a [rows, cols] tensor of a block type, its float16 scales set small (uint8
    [rows, bytes]): valid data of every type in RANDOM_BLOCK_SCALES (TQ2_0's 2-bit codes kept to the
    three ternary ones)."""
    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // block_size, block_bytes), dtype=np.uint8)
    if qtype == "TQ2_0":
        trits = rng.integers(0, 3, size=(rows, cols // block_size, 64, 4), dtype=np.uint8)
        blocks[:, :, :64] = (trits << np.array([0, 2, 4, 6], dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)
    for offset, scale in RANDOM_BLOCK_SCALES[qtype]:
        jitter = rng.uniform(0.5, 1.5, size=blocks.shape[:2]).astype(np.float16)
        if qtype in _SIGNED_SCALES:
            jitter *= rng.choice([-1, 1], size=jitter.shape).astype(np.float16)
        halves = (jitter * np.float16(scale)).astype(np.float16)
        if offset < 0:  # IQ1_M: d's 16 bits in the top nibble of each of the last four uint16s
            tail = blocks[:, :, -8:].copy().view(np.uint16)
            bits = halves.view(np.uint16)[..., None] >> np.array([0, 4, 8, 12], dtype=np.uint16)
            blocks[:, :, -8:] = ((tail & np.uint16(0x0FFF)) | ((bits & 0xF) << 12)).view(np.uint8)
        else:
            blocks[:, :, offset : offset + 2] = halves.view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)


def hf_reference(gguf_path: Path) -> torch.nn.Module:
    """transformers' own GGUF loading of the file (dequantized, float32), for comparisons."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


def assert_reads_like_the_gguf_package(path: Path) -> None:
    """batchlm's GGUFFile gives every metadata value and every tensor (name, type, GGML shape, numpy
    view and bytes) that the `gguf` package's own reader gives for `path`."""
    from gguf import GGUFReader

    from batchlm.models.gguf_reader import GGUFFile

    ours, theirs = GGUFFile(path), GGUFReader(str(path), "r")
    keys = [key for key in theirs.fields if not key.startswith("GGUF.")]  # the header's own counts
    for key in keys:
        expected = theirs.fields[key].contents()
        assert ours.metadata(key) == expected, key
        assert type(ours.metadata(key)) is type(expected), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == reference.tensor_type, mine.name
        assert mine.shape == tuple(int(d) for d in reference.shape), mine.name
        assert (mine.data.shape, mine.data.dtype) == (reference.data.shape, reference.data.dtype), mine.name
        assert np.array_equal(mine.data, reference.data), mine.name


def write_dequantized_copy(source: Path, target: Path, drop_keys: tuple[str, ...] = ()) -> Path:
    """`target`: the GGUF file `source` with every tensor as F32 of its gguf.quants.dequantize values
    and the same metadata (what a loader of the quantized file must read), less the keys in
    `drop_keys` (a file from a converter that did not write them yet)."""
    from gguf import GGUFReader, GGUFValueType
    from gguf.quants import dequantize

    reader = GGUFReader(str(source), "r")
    writer = GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue  # the header's counts, what the writer adds itself, and the keys left out
        sub_type = GGUFValueType(field.types[-1]) if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), GGUFValueType(field.types[0]), sub_type)
    for tensor in reader.tensors:
        values = dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
