"""GGUF models (models/gguf_file.py, models/gguf_model_dir.py) against transformers loading the same
file: greedy tokens and logprobs for every tensor type, alone and batched; tokenizer and chat
template from the metadata; clear errors for what we do not load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from transformers import AutoConfig, AutoModelForCausalLM

from batchlm import LLM, SamplingParams
from batchlm.layers.quantization import registry
from batchlm.layers.quantization.base import QuantizedTensor
from batchlm.models.gguf_file import unpermute_rows
from batchlm.models.gguf_model_dir import find_gguf_file, gguf_source, prepare_gguf_model_dir
from batchlm.models.gguf_reader import GGUFFile
from batchlm.models.gguf_rope import llama3_divisors, llama3_parameters, rope_scaling
from batchlm.models.loader import LoadedModel, load_model
from batchlm.tokenizer.tokenizer import Tokenizer
from gguf_builder import hf_reference, permute_like_llama_cpp, write_tiny_gguf
from models_harness import (
    CPU,
    LOGPROB_ATOL,
    PROMPTS,
    Chunk,
    assert_greedy_matches_hf,
    greedy_generate,
    hf_greedy,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)

NEW_TOKENS = 12
# Q8_0 weights against the float ones they were rounded from.
Q8_LOGPROB_ATOL = 2e-2


@pytest.fixture(autouse=True)
def dequantized_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin the loader against transformers, so quantized layers take the dequantized path
    here; the quantized CPU kernels are compared with it in test_cpu_quantized_model.py."""
    monkeypatch.setattr(registry, "kernels_available", lambda: False)


def _load_gguf(gguf_path: Path, cache: Path) -> LoadedModel:
    return load_model(prepare_gguf_model_dir(gguf_path, cache), torch.float32, CPU, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "qtype", "tied"),
    [
        ("llama", "F32", False),
        ("llama", "F16", True),
        ("llama", "BF16", True),
        ("llama", "Q8_0", False),
        ("llama", "Q4_0", True),
        ("llama", "Q4_1", False),
        ("llama", "Q5_0", False),
        ("llama", "Q2_K", False),
        ("llama", "Q3_K", False),
        ("llama", "Q4_K", True),
        ("llama", "Q5_K", False),
        ("llama", "Q6_K", False),
        ("qwen2", "Q8_0", False),
        ("qwen2", "Q4_K", True),
    ],
)
def test_greedy_matches_transformers_on_the_same_gguf(
    tmp_path: Path, model_type: str, qtype: str, tied: bool
) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model_type, qtype, tied, seed=1)
    loaded = _load_gguf(gguf_path, tmp_path / "cache")
    assert loaded.model.tie_word_embeddings is tied
    hf = hf_reference(gguf_path)
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


def test_qwen3_with_its_q_k_norms_matches_transformers(tmp_path: Path) -> None:
    # transformers' GGUF reader takes no head_dim from a qwen3 file (its config default, 128, stays).
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3", "Q8_0", True, overrides={"head_dim": 128})
    loaded = _load_gguf(gguf_path, tmp_path / "cache")
    assert_greedy_matches_hf(loaded, hf_reference(gguf_path), [PROMPTS[1]], NEW_TOKENS)


LLAMA3_BAND = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    ("scaling", "reached"),
    [
        # Llama 3.2's: its band lies beyond these prompts' positions; the parameters read are pinned.
        ({**LLAMA3_BAND, "factor": 32.0, "original_max_position_embeddings": 8192}, False),
        # A band short prompts reach: most frequencies are scaled or interpolated.
        ({**LLAMA3_BAND, "factor": 8.0, "original_max_position_embeddings": 64}, True),
        ({"rope_type": "linear", "factor": 4.0}, True),
        # Qwen's long-context setting, over an original length these prompts pass.
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, True),
    ],
    ids=["llama3.2", "llama3-short-band", "linear", "yarn"],
)
def test_rope_scaling_reads_back_and_matches_transformers(
    tmp_path: Path, scaling: dict[str, Any], reached: bool
) -> None:
    # llama.cpp writes Llama 3's scaling as per-frequency divisors (rope_freqs), linear as metadata.
    gguf_path = write_tiny_gguf(
        tmp_path / "tiny.gguf", "llama", "F32", overrides={"rope_scaling": dict(scaling)}
    )
    model_dir = prepare_gguf_model_dir(gguf_path, tmp_path / "cache")
    assert json.loads((model_dir / "config.json").read_text())["rope_scaling"] == scaling
    loaded = _load_gguf(gguf_path, tmp_path / "cache")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ours, our_logprobs = greedy_generate(loaded, PROMPTS[1], NEW_TOKENS)
    theirs, their_logprobs = hf_greedy(hf, PROMPTS[1], NEW_TOKENS)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=LOGPROB_ATOL, rtol=0)
    if reached:  # the same weights without the scaling answer otherwise: the comparison can fail
        unscaled = AutoConfig.from_pretrained(str(tmp_path / "hf"))
        unscaled.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        plain = AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "hf"), config=unscaled, dtype=torch.float32
        )
        _, plain_logprobs = hf_greedy(plain.eval(), PROMPTS[1], NEW_TOKENS)
        assert (plain_logprobs - their_logprobs).abs().max() > 100 * LOGPROB_ATOL


def test_rope_freqs_of_another_form_are_refused(tmp_path: Path) -> None:
    scaling = {**LLAMA3_BAND, "factor": 8.0, "original_max_position_embeddings": 64}
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", overrides={"rope_scaling": dict(scaling)})
    reader = GGUFFile(gguf_path)
    [freqs] = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    divisors = np.array(freqs.data, dtype=np.float64)
    assert np.allclose(divisors, llama3_divisors(10000.0, 64, 8.0, 1.0, 4.0, 64), rtol=1e-6)
    assert rope_scaling(reader, "llama", 64, 10000.0, gguf_path) == scaling
    # Divisors no Llama 3 band gives (here, rising past the slow end) are named, not guessed.
    assert llama3_parameters(divisors * np.linspace(1, 2, divisors.size), 10000.0, 64) is None


# Gemma 3 as its 4B-27B are (global layers at base 1e6, linearly scaled; local ones at 1e4), and
# Gemma 2 with its soft-caps; windows of 8 tokens, so these prompts reach past them.
GEMMA_CASES = {
    "gemma3_text": {
        "num_hidden_layers": 6,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
    "gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
}


@pytest.mark.parametrize("model_type", sorted(GEMMA_CASES))
def test_gemma_matches_transformers(tmp_path: Path, model_type: str) -> None:
    # The file as llama.cpp writes it: norm weights plus one, the windows and caps as metadata.
    overrides = {**GEMMA_CASES[model_type], "sliding_window": 8, "query_pre_attn_scalar": 64}
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model_type, "F32", True, overrides=overrides)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    theirs, their_logprobs = hf_greedy(hf, PROMPTS[1], NEW_TOKENS)
    ours, our_logprobs = greedy_generate(_load_gguf(gguf_path, tmp_path / "cache"), PROMPTS[1], NEW_TOKENS)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=LOGPROB_ATOL, rtol=0)
    # And through the engine (paged KV cache, windowed attention), greedy. (transformers converts a
    # Gemma file's tokenizer as SentencePiece, which this byte-level test vocabulary is not.)
    llm = LLM(model=str(gguf_path), tokenizer=str(tmp_path / "hf"), device="cpu")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    assert list(llm.generate([PROMPTS[1]], params)[0].outputs[0].token_ids) == theirs


# Phi-4-mini's shape: LongRoPE over half of each head, a window, fused q/k/v and gate/up rows. These
# prompts stay below the original length (see tests/test_models_phi3.py).
PHI4_MINI = {
    "pad_token_id": 0,
    "sliding_window": 6,
    "original_max_position_embeddings": 64,
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.3, 2.1, 3.7] * 4,
        "long_factor": [1.5, 4.0, 9.0, 20.0] * 4,
    },
}


def test_phi3_matches_transformers(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "f32" / "tiny.gguf", "phi3", "F32", True, overrides=PHI4_MINI)
    config = json.loads((prepare_gguf_model_dir(gguf_path, tmp_path / "cache") / "config.json").read_text())
    for key in ("long_factor", "short_factor"):
        assert config["rope_scaling"][key] == PHI4_MINI["rope_parameters"][key]
    assert (config["partial_rotary_factor"], config["original_max_position_embeddings"]) == (0.5, 64)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32" / "hf"), dtype=torch.float32).eval()
    theirs, their_logprobs = hf_greedy(hf, PROMPTS[1], NEW_TOKENS)
    ours, our_logprobs = greedy_generate(_load_gguf(gguf_path, tmp_path / "cache"), PROMPTS[1], NEW_TOKENS)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=LOGPROB_ATOL, rtol=0)
    # Q8_0 rows of the fused q/k/v and gate/up tensors, split by their bytes: the same model within
    # Q8_0's rounding.
    q8_path = write_tiny_gguf(tmp_path / "q8" / "tiny.gguf", "phi3", "Q8_0", True, overrides=PHI4_MINI)
    q8, q8_logprobs = greedy_generate(_load_gguf(q8_path, tmp_path / "cache"), PROMPTS[1], NEW_TOKENS)
    assert q8 == theirs
    torch.testing.assert_close(q8_logprobs, their_logprobs, atol=Q8_LOGPROB_ATOL, rtol=0)


# Qwen3-30B-A3B's kind: 8 experts, 2 a token, renormalized; every layer sparse.
QWEN3_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "norm_topk_prob": True}
MIXTRAL = {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None}


def test_qwen3_moe_matches_transformers(tmp_path: Path) -> None:
    # Experts stacked a projection and layer in one tensor, as llama.cpp writes them.
    gguf_path = write_tiny_gguf(tmp_path / "f32" / "tiny.gguf", "qwen3_moe", "F32", overrides=QWEN3_MOE)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32" / "hf"), dtype=torch.float32).eval()
    assert_greedy_matches_hf(_load_gguf(gguf_path, tmp_path / "cache"), hf, [PROMPTS[1]], NEW_TOKENS)
    # Quantized stacks split into experts by their rows' bytes: each expert's weights are the HF
    # expert's within Q8_0's rounding (half a step of 1/127 of its block's largest value).
    q8_path = write_tiny_gguf(tmp_path / "q8" / "tiny.gguf", "qwen3_moe", "Q8_0", overrides=QWEN3_MOE)
    _assert_experts_within_a_q8_step(_load_gguf(q8_path, tmp_path / "cache"), hf)


def _assert_experts_within_a_q8_step(loaded: LoadedModel, hf: torch.nn.Module) -> None:
    """Layer 1's experts, in transformers' stacked layout, are the HF experts' within Q8_0's rounding
    (half a step of 1/127 of a block's largest value, bounded by a whole step of the expert's)."""
    experts = loaded.model.model.layers[1].mlp.experts
    reference = hf.model.layers[1].mlp.experts
    for ours_stack, theirs_stack in (
        (experts.gate_up_proj, reference.gate_up_proj),
        (experts.down_proj, reference.down_proj),
    ):
        for expert in range(theirs_stack.shape[0]):
            step = theirs_stack[expert].abs().max() / 127
            assert (ours_stack[expert] - theirs_stack[expert]).abs().max() <= step


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_mixtral_as_llama_with_experts_matches_transformers(tmp_path: Path, qtype: str) -> None:
    # llama.cpp writes Mixtral as a "llama" file whose layers hold a router and expert stacks.
    gguf_path = write_tiny_gguf(tmp_path / "f" / "tiny.gguf", "mixtral", qtype, overrides=MIXTRAL)
    loaded = _load_gguf(gguf_path, tmp_path / "cache")
    assert type(loaded.model).__name__ == "MixtralForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f" / "hf"), dtype=torch.float32).eval()
    if qtype == "F32":
        assert_greedy_matches_hf(loaded, hf, [PROMPTS[1]], NEW_TOKENS)
        return
    # Quantized: each expert's gate, up and down (w1, w3, w2) are the HF expert's within Q8_0's rounding.
    _assert_experts_within_a_q8_step(loaded, hf)


def test_batched_step_gives_each_prompt_its_own_logits(tmp_path: Path) -> None:
    loaded = _load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q4_K"), tmp_path / "cache")
    caches = make_kv_caches(loaded, 16)
    chunks = [Chunk(PROMPTS[0], 0, [0, 1]), Chunk(PROMPTS[1], 0, [2, 3, 4, 5, 6, 7])]
    batched = run_step(loaded.model, caches, chunks)
    for chunk, row in zip(chunks, batched, strict=True):
        alone = run_step(loaded.model, make_kv_caches(loaded, 16), [chunk])[0]
        torch.testing.assert_close(row, alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_K", "IQ3_S", "IQ4_NL"])
def test_tensor_parallel_ranks_equal_one_rank(tmp_path: Path, qtype: str) -> None:
    # Q4_K's and IQ3_S's 256-value blocks do not divide o_proj's 128 columns per rank: those load from
    # a window over the covering blocks (IQ4_NL's 32-value blocks split on their edges; dequantized
    # here, the kernels' case is in test_cpu_quantized_model.py).
    model_dir = prepare_gguf_model_dir(
        write_tiny_gguf(tmp_path / "tiny.gguf", "llama", qtype), tmp_path / "c"
    )
    single = load_model(model_dir, torch.float32, CPU, progress=False)
    ranks = [
        load_model(model_dir, torch.float32, CPU, tp=group, progress=False) for group in thread_groups(2)
    ]
    expected, expected_logprobs = greedy_generate(single, PROMPTS[0], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 8), 2):
        assert tokens == expected
        torch.testing.assert_close(logprobs, expected_logprobs, atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize(("qtype", "tensor_types"), [("Q4_K", {"attn_v.weight": "Q6_K"}), ("Q8_0", None)])
def test_int8_on_a_block_quantized_gguf_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str, tensor_types: dict[str, str] | None
) -> None:
    # int8 quantizes float weights: on these it would silently change nothing (wherever it can run).
    monkeypatch.setattr(registry, "kernels_available", lambda: True)
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", qtype, tensor_types=tensor_types)
    named = "Q4_K, Q6_K" if tensor_types else qtype
    with pytest.raises(
        ValueError, match=rf"tiny\.gguf is already quantized \({named}\); drop --quantization int8"
    ):
        load_model(prepare_gguf_model_dir(gguf_path, tmp_path / "c"), torch.float32, CPU, quantization="int8")


def test_int8_without_the_quantized_kernels_is_refused(tmp_path: Path) -> None:
    # (The autouse fixture makes the kernels unavailable.) Loading in float would ignore the option.
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "F16")
    with pytest.raises(
        ValueError, match="--quantization int8 runs on the quantized CPU kernels, which are unavailable"
    ):
        load_model(prepare_gguf_model_dir(gguf_path, tmp_path / "c"), torch.float32, CPU, quantization="int8")


def test_unpermute_undoes_llama_cpp_for_dense_and_quantized_rows() -> None:
    rows = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)  # 4 heads of 8 rows
    permuted = torch.from_numpy(permute_like_llama_cpp(rows, 4))
    assert not torch.equal(permuted, torch.from_numpy(rows))
    assert torch.equal(unpermute_rows(permuted, 4), torch.from_numpy(rows))
    as_bytes = QuantizedTensor("Q8_0", permuted.view(torch.uint8), 32, 32, 34)
    restored = unpermute_rows(as_bytes, 4)
    assert isinstance(restored, QuantizedTensor)
    assert torch.equal(restored.data.view(torch.float32), torch.from_numpy(rows))


def test_tokenizer_and_chat_template_come_from_the_metadata(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q8_0")
    ours = Tokenizer.from_pretrained(prepare_gguf_model_dir(gguf_path, tmp_path / "cache"))
    original = Tokenizer.from_pretrained(tmp_path / "hf")
    text = "Once upon a time, the model said: héllo wörld 123!"
    assert ours.encode(text) == original.encode(text)
    assert ours.decode(original.encode(text)) == original.decode(original.encode(text))
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages) == original.apply_chat_template(messages)
    assert ours.bos_token_id == original.bos_token_id and set(ours.eos_token_ids) == set(
        original.eos_token_ids
    )


def test_derived_directory_is_cached_and_points_at_the_file(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    first = prepare_gguf_model_dir(gguf_path, tmp_path / "cache")
    assert gguf_source(first) == gguf_path.resolve()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert prepare_gguf_model_dir(gguf_path, tmp_path / "cache") == first
    assert (first / "config.json").stat().st_mtime_ns == stamp


def test_a_file_or_a_directory_with_one_gguf_is_a_gguf_model(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert find_gguf_file(gguf_path) == gguf_path
    assert find_gguf_file(tmp_path) == gguf_path
    assert find_gguf_file(tmp_path / "hf") is None  # safetensors: an HF directory
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        find_gguf_file(tmp_path)


def test_offline_engine_serves_a_gguf_path(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q4_0")
    llm = LLM(model=str(gguf_path), device="cpu")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    output = llm.generate([PROMPTS[0]], params)[0].outputs[0]
    expected, _ = hf_greedy(hf_reference(gguf_path), PROMPTS[0], 6)
    assert list(output.token_ids) == expected


def _write_gguf(path: Path, arch: str, tensor_type: GGMLQuantizationType, data: np.ndarray) -> Path:
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", "falcon", GGMLQuantizationType.F32, np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'"):
        prepare_gguf_model_dir(path, tmp_path / "cache")


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    # NVFP4 (4-bit floats under FP8 scales), which the loader does not read: refused before any weight
    # loads, naming the tensor, its type and the types that do load (the i-quants among them).
    raw = np.zeros((4, 36), np.uint8)  # one NVFP4 block of 64 values per row
    path = _write_gguf(tmp_path / "m.gguf", "llama", GGMLQuantizationType.NVFP4, raw)
    with pytest.raises(ValueError, match=r"'token_embd\.weight' has GGML type NVFP4") as refused:
        prepare_gguf_model_dir(path, tmp_path / "cache")
    assert "IQ4_XS" in str(refused.value) and "TQ2_0" in str(refused.value)


def test_a_file_that_is_not_gguf_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        prepare_gguf_model_dir(path, tmp_path / "cache")
