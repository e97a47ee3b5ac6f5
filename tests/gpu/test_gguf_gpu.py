"""GGUF files on CUDA: every tensor type is dequantized at load (bf16 by default), and in float32 the
engine's greedy tokens equal transformers loading the same file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from devices import require_cuda

from batchlm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

require_cuda()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_builder import hf_reference, write_tiny_gguf  # noqa: E402

PROMPT = [1, 5, 9, 14, 3, 7]


def _hf_greedy(gguf_path: Path, count: int) -> list[int]:
    model = hf_reference(gguf_path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=count, do_sample=False, min_new_tokens=count)
    return [int(t) for t in out[0, len(PROMPT) :]]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_float32_greedy_on_cuda_matches_transformers(tmp_path: Path, qtype: str) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", qtype, seed=1)
    llm = LLM(model=str(gguf_path), device="cuda", dtype="float32", enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    output = llm.generate([PROMPT], params)[0].outputs[0]
    assert list(output.token_ids) == _hf_greedy(gguf_path, 6)


def test_bf16_default_serves_a_quantized_file(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q4_K", seed=2)
    llm = LLM(model=str(gguf_path), device="cuda")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate([PROMPT] * 3, params)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    assert all(len(t) == 8 for t in tokens)
    assert tokens[0] == tokens[1] == tokens[2]
