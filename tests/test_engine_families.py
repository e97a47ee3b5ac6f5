"""Sliding-window, soft-capped and partial-rotary families, and those whose blocks scale, norm or rotate
otherwise than Llama's (Granite, OLMo 2, SmolLM3, GLM-4, EXAONE 4.0, Ministral 3, Seed-OSS's biases,
gpt-oss's sinks and experts), through the whole engine: greedy tokens equal transformers' alone,
batched, in chunked prefill, after preemption and from the prefix cache, with contexts several times
the window."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm import LLM, SamplingParams
from models_harness import hf_generated, hf_reference_model
from test_models_ministral3 import MINISTRAL3

WINDOW = 8
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
LAYERS = ["sliding_attention", "full_attention"]
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2": ("gemma2", {"layer_types": LAYERS, "sliding_window": WINDOW, "query_pre_attn_scalar": 24,
                          "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "pad_token_id": 0}),
    "gemma3": ("gemma3_text", {"layer_types": LAYERS, "sliding_window": WINDOW, "pad_token_id": 0,
                               "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}}),
    "phi3": ("phi3", {"sliding_window": WINDOW, "partial_rotary_factor": 0.5, "pad_token_id": 0}),
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    # Mistral Small 3.1/3.2's multimodal checkpoint, its text model windowed as Mistral's.
    "mistral3": ("mistral3", {"sliding_window": WINDOW}),
    "granite": ("granite", {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.5,
                            "logits_scaling": 0.25}),
    "olmo2": ("olmo2", {"pad_token_id": 0}),
    # Its second layer without RoPE, and windowed (as SmolLM3 windows its NoPE layers when asked to).
    "smollm3": ("smollm3", {"no_rope_layers": [1, 0], "use_sliding_window": True, "sliding_window": WINDOW,
                            "pad_token_id": 0}),
    # Half of each head rotating over interleaved pairs (q/k rows reordered at load), four norms a block.
    "glm4": ("glm4", {"pad_token_id": 0}),
    # A window layer, then a global one without RoPE; norms after the attention and the MLP only.
    "exaone4": ("exaone4", {"layer_types": LAYERS, "sliding_window": WINDOW}),
    # Queries scaled by position past every 16 tokens (YaRN's original length), over YaRN; as its own
    # checkpoint, and as the text model of a Mistral 3 one, windowed as Mistral's.
    "ministral3": ("ministral3", MINISTRAL3),
    "mistral3-ministral3": ("mistral3", {**MINISTRAL3, "text_model_type": "ministral3",
                                         "sliding_window": WINDOW}),
    # Llama with q/k/v and o biases, each its own field.
    "seed_oss": ("seed_oss", {"attention_out_bias": True, "pad_token_id": 0}),
    # Sinks on every layer, window and full layers alternating, YaRN; biased router and experts whose
    # clamped SwiGLU's limit the tiny experts reach.
    "gpt_oss": ("gpt_oss", {"sliding_window": WINDOW, "swiglu_limit": 0.1}),
}  # fmt: skip


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(10, 300, (n,), generator=generator).tolist() for n in (5, 17, 33, 9, 40)]


def generate(model_dir: Path, batch: list[list[int]], **kwargs: Any) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=str(model_dir), device="cpu", **kwargs)
    return llm, [list(out.outputs[0].token_ids) for out in llm.generate(batch, GREEDY)]


def transformers_tokens(
    model_dir: Path, batch: list[list[int]], new_tokens: int = MAX_TOKENS
) -> list[list[int]]:
    hf = hf_reference_model(model_dir)
    tokens = []
    for prompt in batch:
        tokens.append(hf_generated(hf, prompt, new_tokens))
    return tokens


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(
    request: pytest.FixtureRequest, tiny_model_dir: Callable[..., Path]
) -> tuple[Path, list[list[int]]]:
    model_type, overrides = FAMILIES[request.param]
    model_dir = tiny_model_dir(model_type, seed=5, **overrides)
    return model_dir, transformers_tokens(model_dir, prompts())


def test_alone_and_batched_match_transformers(family: tuple[Path, list[list[int]]]) -> None:
    model_dir, expected = family
    _, alone = generate(model_dir, prompts()[4:], max_num_seqs=1)
    assert alone == expected[4:]
    assert generate(model_dir, prompts())[1] == expected


def test_chunked_prefill_matches_transformers(family: tuple[Path, list[list[int]]]) -> None:
    model_dir, expected = family
    assert generate(model_dir, prompts(), max_num_batched_tokens=6, max_num_seqs=3)[1] == expected


def test_preemption_matches_transformers(family: tuple[Path, list[list[int]]]) -> None:
    model_dir, expected = family
    llm, tokens = generate(
        model_dir, prompts(), block_size=4, num_gpu_blocks_override=16, enable_prefix_caching=False
    )
    assert tokens == expected
    assert llm.engine_core.stats().num_preemptions > 0


def test_prefix_cache_hits_match_transformers(family: tuple[Path, list[list[int]]]) -> None:
    model_dir, _ = family
    base = prompts()[4]
    batch = [[*base, 11, 12], [*base, 13]]
    expected = transformers_tokens(model_dir, batch)
    llm = LLM(model=str(model_dir), device="cpu", block_size=4)
    first = llm.generate(batch[:1], GREEDY)[0]
    second = llm.generate(batch[1:], GREEDY)[0]
    assert [list(first.outputs[0].token_ids), list(second.outputs[0].token_ids)] == expected
    assert second.num_cached_tokens == (len(base) // 4) * 4
