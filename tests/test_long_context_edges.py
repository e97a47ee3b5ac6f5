"""Long contexts at the engine's edges: Qwen 2/3 windows on the layers from max_window_layers on, against
transformers with prefill chunks and cached prefixes ending at and inside a window; requests that end
exactly at max_model_len; prompts the KV cache cannot hold, refused as the prompt's fault; and Gemma 2
GGUF files without their window or soft-cap keys, read with llama.cpp's defaults."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.core.facts import ModelFacts
from batchlm.engine.client import RequestRejectedError
from batchlm.engine.input_processor import CONTEXT_LENGTH_EXCEEDED, FieldNames, InputProcessor
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.loader import load_model
from batchlm.outputs import FinishReason
from gguf_builder import write_dequantized_copy, write_tiny_gguf
from models_harness import assert_greedy_matches_hf
from test_engine_families import transformers_tokens

WINDOW = 8
NEW_TOKENS = 10
# Layer 0 attends to everything, layer 1 within the window (transformers' layer_types from these).
QWEN_WINDOW = {"sliding_window": WINDOW, "use_sliding_window": True, "max_window_layers": 1}


def _prompt(length: int, seed: int = 2) -> list[int]:
    return torch.randint(10, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_window_layers_match_transformers_across_chunks_and_cached_prefixes(
    tiny_model_dir: Callable[..., Path], model_type: str
) -> None:
    model_dir = tiny_model_dir(model_type, seed=5, **QWEN_WINDOW)
    base = _prompt(70)
    # 70 tokens in window-sized chunks (each ends at a window edge); then prompts whose cached prefix
    # (whole 4-token blocks of the first) ends 3 tokens into a window and 1 token before one.
    prompts = [base, [*base[:43], 5, 6], [*base[:23], 7]]
    expected = transformers_tokens(model_dir, prompts, NEW_TOKENS)
    llm = LLM(model=str(model_dir), device="cpu", block_size=4, max_num_batched_tokens=WINDOW)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = [llm.generate([prompt], params)[0] for prompt in prompts]
    assert [list(out.outputs[0].token_ids) for out in outputs] == expected
    assert [out.num_cached_tokens for out in outputs[1:]] == [40, 20]


def test_requests_ending_exactly_at_max_model_len_match_transformers(
    tiny_model_dir: Callable[..., Path],
) -> None:
    model_dir = tiny_model_dir("mistral", seed=5, sliding_window=WINDOW)
    max_len = 40
    llm = LLM(model=str(model_dir), device="cpu", max_model_len=max_len, block_size=4)
    prompts = [_prompt(max_len - 1, seed=3), _prompt(max_len - 4, seed=4)]
    expected = transformers_tokens(model_dir, prompts, 4)
    # No max_tokens: all the room the context leaves; then exactly that room, asked for.
    for max_tokens in (None, 1):
        out = llm.generate(
            prompts[:1], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        )
        assert list(out[0].outputs[0].token_ids) == expected[0][:1]
        assert out[0].outputs[0].finish_reason == FinishReason.LENGTH
    out = llm.generate(prompts[1:], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, n=2))
    assert [list(c.token_ids) for c in out[0].outputs] == [expected[1]] * 2
    with pytest.raises(RequestRejectedError, match="you requested 41 tokens"):
        llm.generate(prompts[:1], SamplingParams(max_tokens=2))


# A context of 64 tokens over a KV cache of 2 blocks of 4 (8 tokens).
SMALL_CACHE = ModelFacts(max_model_len=64, vocab_size=50, num_blocks=2, block_size=4)
COMPLETIONS = FieldNames("prompt", "prompt", "prompt")


@pytest.mark.parametrize("max_tokens", [None, 1, 3])
def test_a_prompt_the_kv_cache_cannot_hold_is_refused_as_too_long(max_tokens: int | None) -> None:
    # 9 prompt tokens need 9 slots: no max_tokens makes room, so the error must not ask to lower it.
    with pytest.raises(RequestRejectedError) as info:
        InputProcessor(SMALL_CACHE).process([1] * 9, SamplingParams(max_tokens=max_tokens), names=COMPLETIONS)
    message = str(info.value)
    assert "9 tokens of the prompt need 3 KV-cache blocks" in message
    assert "shorten the prompt" in message and "max_tokens" not in message
    assert (info.value.param, info.value.code) == ("prompt", CONTEXT_LENGTH_EXCEEDED)


def test_a_prompt_the_kv_cache_holds_with_too_long_an_output_names_max_tokens() -> None:
    # 8 prompt tokens fit; 2 new tokens would need a 9th slot (the last one needs none).
    processor = InputProcessor(SMALL_CACHE)
    assert processor.process([1] * 8, SamplingParams(max_tokens=1), names=COMPLETIONS).params.max_tokens == 1
    with pytest.raises(RequestRejectedError, match="lower max_tokens") as info:
        processor.process([1] * 8, SamplingParams(max_tokens=2), names=COMPLETIONS)
    assert info.value.param == "max_tokens"


# Keys the first Gemma 2 conversions lacked; llama.cpp then windows at 4096 and soft-caps at 50 / 30.
GEMMA2_CAPS = ("gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping")
GEMMA2_WINDOW = "gemma2.attention.sliding_window"


@pytest.mark.parametrize("dropped", [GEMMA2_CAPS, (*GEMMA2_CAPS, GEMMA2_WINDOW)], ids=["caps", "caps+window"])
def test_a_gemma2_gguf_without_its_caps_or_window_reads_llama_cpps_defaults(
    tmp_path: Path, dropped: tuple[str, ...]
) -> None:
    caps = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    # A file gives no query scale: llama.cpp's 1/sqrt(head_dim), as the HF config states it here.
    overrides = {**caps, "sliding_window": 4096, "query_pre_attn_scalar": 64}
    stated = write_tiny_gguf(tmp_path / "stated.gguf", "gemma2", "F32", True, overrides=overrides)
    bare = write_dequantized_copy(stated, tmp_path / "bare.gguf", drop_keys=dropped)
    loaded = load_model(prepare_gguf_model_dir(bare, tmp_path / "cache"), torch.float32, torch.device("cpu"))
    assert loaded.model.config.final_logit_softcap == 30.0
    assert [layer.self_attn.spec.logit_softcap for layer in loaded.model.model.layers] == [50.0, 50.0]
    assert [layer.self_attn.spec.sliding_window for layer in loaded.model.model.layers] == [4096, None]
    # The capped final logits of this random model differ from uncapped ones by far more than 1e-4.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = _prompt(12)
    assert_greedy_matches_hf(loaded, hf, [prompt], 4)
