"""gpt-oss GGUF files (llama.cpp's `gpt-oss` architecture) written as llama.cpp's converter writes
them: the config read back as the HF checkpoint's (experts, the window and which layers slide,
YaRN's parameters with its untruncated ramp), and greedy tokens and logprobs against transformers'
GptOssForCausalLM holding the file's weights dequantized (experts in MXFP4, the rest F32 or Q8_0),
through the model and through the engine; MXFP4 experts stay quantized on the CPU kernels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from batchlm import LLM, SamplingParams
from batchlm.kernels.cpu_quant import quant_library
from batchlm.layers.moe import FusedMoE
from batchlm.layers.quantization import registry
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.gpt_oss import GptOssForCausalLM
from batchlm.models.loader import LoadedModel
from gguf_builder import write_tiny_gguf
from models_harness import (
    PROMPTS,
    Chunk,
    assert_greedy_matches_hf,
    hf_greedy,
    load_fp32_cpu,
    make_kv_caches,
    run_step,
)

NEW_TOKENS = 12
# The released models' kind at a tiny size: 4 experts, 2 a token, a window of 4 (PROMPTS run to 24
# tokens) and their context (YaRN stretches 4096 positions 32 times).
GPT_OSS = {
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "intermediate_size": 256,
    "sliding_window": 4,
    "max_position_embeddings": 131072,
}
# The experts as the published files hold them.
MXFP4_EXPERTS = {"_exps.weight": "MXFP4"}
CASES: dict[str, tuple[str, dict[str, str] | None]] = {
    "f32": ("F32", None),
    "q8_0": ("Q8_0", None),
    "mxfp4-experts": ("F32", MXFP4_EXPERTS),
    "mxfp4-experts-q8_0": ("Q8_0", MXFP4_EXPERTS),
}
# The logits of the quantized CPU kernels against the same weights dequantized, as a fraction of the
# largest: they round each block of activations to int8 (tests/test_cpu_quantized_model.py).
KERNEL_LOGIT_ERROR = 1e-3


def _write(
    tmp_path: Path,
    qtype: str = "F32",
    tensor_types: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
    metadata: dict[str, int | float] | None = None,
) -> Path:
    return write_tiny_gguf(
        tmp_path / "tiny.gguf",
        "gpt_oss",
        qtype,
        overrides={**GPT_OSS, **(overrides or {})},
        metadata=metadata,
        tensor_types=tensor_types,
        seed=71,
    )


def _without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized layers on the dequantized path, which transformers' float32 model matches to
    summation order."""
    monkeypatch.setattr(registry, "kernels_available", lambda: False)


# Where each GGUF tensor of a layer goes in transformers' model (llama.cpp's converter, undone).
_LAYER_PARAMETERS = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate_inp": "mlp.router",
}
_GLOBAL_PARAMETERS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Each expert stack's place in transformers' [E, H, 2I] gate_up_proj (gate and up interleaved) and
# [E, I, H] down_proj, and in their biases.
_EXPERT_COLUMNS = {
    "ffn_gate_exps": ("gate_up_proj", slice(0, None, 2)),
    "ffn_up_exps": ("gate_up_proj", slice(1, None, 2)),
    "ffn_down_exps": ("down_proj", slice(None)),
}


def transformers_with_the_file_weights(gguf_path: Path) -> torch.nn.Module:
    """transformers' GptOssForCausalLM of the file's HF checkpoint (gguf_path.parent / "hf"), every
    parameter replaced by the file's tensor dequantized."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent / "hf"), dtype=torch.float32).eval()
    params = dict(hf.named_parameters())
    replaced = set()
    with torch.no_grad():
        for tensor in GGUFReader(str(gguf_path)).tensors:
            values = dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
            name = _put(params, tensor.name, torch.from_numpy(values))
            replaced.add(name)
    assert replaced == set(params), sorted(set(params) - replaced)
    return hf


def _put(params: dict[str, torch.nn.Parameter], gguf_name: str, values: torch.Tensor) -> str:
    """Write one GGUF tensor's values into transformers' parameter; returns the parameter's name."""
    if gguf_name in _GLOBAL_PARAMETERS:
        params[_GLOBAL_PARAMETERS[gguf_name]].copy_(values)
        return _GLOBAL_PARAMETERS[gguf_name]
    _, layer, part, kind = gguf_name.split(".")
    prefix = f"model.layers.{layer}."
    if part == "attn_sinks":
        name = f"{prefix}self_attn.sinks"
        params[name].copy_(values)
    elif part in _EXPERT_COLUMNS:
        stack, columns = _EXPERT_COLUMNS[part]
        if kind == "weight":  # the file's [E, rows, cols], transformers' [E, cols, rows]
            name = f"{prefix}mlp.experts.{stack}"
            params[name][:, :, columns] = values.transpose(1, 2)
        else:
            name = f"{prefix}mlp.experts.{stack}_bias"
            params[name][:, columns] = values
    else:
        name = f"{prefix}{_LAYER_PARAMETERS[part]}.{kind}"
        params[name].copy_(values)
    return name


def test_config_reads_back_as_the_checkpoints(tmp_path: Path) -> None:
    """Experts, window, the layers that slide (the even ones, as llama.cpp assumes and the HF config
    says), YaRN with gpt-oss's betas and untruncated ramp, head size, biases: transformers reads the
    derived config.json as the checkpoint's."""
    from transformers import AutoConfig

    gguf_path = _write(tmp_path, overrides={"num_hidden_layers": 4})
    model_dir = prepare_gguf_model_dir(gguf_path, tmp_path / "cache")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    }
    ours, theirs = AutoConfig.from_pretrained(model_dir), AutoConfig.from_pretrained(tmp_path / "hf")
    fields = (
        "num_local_experts", "num_experts_per_tok", "intermediate_size", "sliding_window", "layer_types",
        "head_dim", "attention_bias", "swiglu_limit", "rope_parameters", "num_hidden_layers",
        "max_position_embeddings", "tie_word_embeddings",
    )  # fmt: skip
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    windows = [layer.attention.sliding_window for layer in load_fp32_cpu(model_dir).model.config.layers]
    assert windows == [4, None, 4, None]


def test_a_stated_window_pattern_is_read(tmp_path: Path) -> None:
    # llama.cpp reads gpt-oss.attention.sliding_window_pattern where a file has it (a period here).
    metadata = {"gpt-oss.attention.sliding_window_pattern": 4}
    gguf_path = _write(tmp_path, overrides={"num_hidden_layers": 4}, metadata=metadata)
    config = json.loads((prepare_gguf_model_dir(gguf_path, tmp_path / "c") / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers_with_the_files_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    _without_kernels(monkeypatch)
    qtype, tensor_types = CASES[case]
    gguf_path = _write(tmp_path, qtype, tensor_types)
    loaded = load_fp32_cpu(prepare_gguf_model_dir(gguf_path, tmp_path / "cache"))
    assert isinstance(loaded.model, GptOssForCausalLM)
    layer = loaded.model.model.layers[0]
    # What the file's biases and sinks load into, each random (a zero would hide a misplaced one).
    experts = layer.mlp.experts
    for loaded_tensor in (
        layer.self_attn.sinks,
        layer.self_attn.qkv_proj.bias,
        layer.self_attn.o_proj.bias,
        layer.mlp.gate.bias,
        experts.gate_up_proj_bias,
        experts.down_proj_bias,
    ):
        assert loaded_tensor is not None and bool((loaded_tensor != 0).all())
    assert_greedy_matches_hf(loaded, transformers_with_the_file_weights(gguf_path), PROMPTS, NEW_TOKENS)


def _logits(loaded: LoadedModel) -> torch.Tensor:
    chunks = [Chunk(PROMPTS[0], 0, [0, 1]), Chunk(PROMPTS[1], 0, [2, 3, 4, 5, 6, 7])]
    return run_step(loaded.model, make_kv_caches(loaded, 16), chunks)


@pytest.mark.skipif(quant_library() is None, reason="no AVX2 CPU or C compiler here")
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_mxfp4_experts_stay_quantized_on_the_cpu_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str
) -> None:
    model_dir = prepare_gguf_model_dir(_write(tmp_path, qtype, MXFP4_EXPERTS), tmp_path / "cache")
    on_kernels = load_fp32_cpu(model_dir)
    experts = [m for m in on_kernels.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(e.quantized is not None for e in experts)
    _without_kernels(monkeypatch)
    reference = _logits(load_fp32_cpu(model_dir))
    ours = _logits(on_kernels)
    assert (ours - reference).abs().max() <= KERNEL_LOGIT_ERROR * reference.abs().max()


def test_engine_generates_transformers_greedy_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_kernels(monkeypatch)
    gguf_path = _write(tmp_path, "F32", MXFP4_EXPERTS)
    llm = LLM(model=str(gguf_path), device="cpu")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    hf = transformers_with_the_file_weights(gguf_path)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected, _ = hf_greedy(hf, prompt, 8)
        assert list(output.outputs[0].token_ids) == expected
