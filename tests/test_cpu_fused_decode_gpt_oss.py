"""gpt-oss through the fused CPU decode stack (runner/fused_decode.py, kernels/cpu_decode_stack.c):
attention sinks in the stack's softmax, the router's bias, the experts' gate/up biases and clamped
SwiGLU, and the down biases added once after the experts' sum. Its logits and KV cache against the
model's layer-by-layer forward on the same quantized weights (tests/test_cpu_fused_decode.py's
check and tolerance), its greedy tokens against that path's and transformers', over prompts longer
than the sliding layers' window."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.kernels.cpu_decode_stack import StackLayer, stack_library
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.gpt_oss import GptOssForCausalLM
from batchlm.models.loader import LoadedModel, load_model
from batchlm.runner import fused_decode
from batchlm.runner.fused_decode import MAX_ROWS, FusedDecode, build_fused_decode
from gguf_builder import write_tiny_gguf
from models_harness import Chunk, greedy_generate, hf_greedy, make_kv_caches, run_step
from test_cpu_fused_decode import BLOCK_SIZE, PROMPTS, _assert_steps_agree, _blocks, _inputs
from test_gguf_gpt_oss import GPT_OSS, MXFP4_EXPERTS, transformers_with_the_file_weights

pytestmark = pytest.mark.skipif(stack_library() is None, reason="no AVX2 CPU or C compiler here")
CPU = torch.device("cpu")
NEW_TOKENS = 10
# test_gguf_gpt_oss's tiny gpt-oss: a window of 4, so every prompt here reaches past it.
WINDOW = GPT_OSS["sliding_window"]


def _write(tmp_path: Path, qtype: str, tensor_types: dict[str, str] | None) -> Path:
    return write_tiny_gguf(
        tmp_path / "tiny.gguf", "gpt_oss", qtype, overrides=GPT_OSS, tensor_types=tensor_types, seed=71
    )


def _load(gguf: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    return load_model(prepare_gguf_model_dir(gguf, gguf.parent / "c"), dtype, CPU, progress=False)


@pytest.fixture(scope="module")
def mxfp4_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The released models' kind: MXFP4 experts beside Q8_0 weights."""
    return _write(tmp_path_factory.mktemp("gpt_oss"), "Q8_0", MXFP4_EXPERTS)


@pytest.fixture(scope="module")
def mxfp4_model(mxfp4_file: Path) -> LoadedModel:
    loaded = _load(mxfp4_file)
    assert isinstance(loaded.model, GptOssForCausalLM)
    return loaded


def test_gpt_oss_takes_the_fused_stack(mxfp4_model: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    layers = mxfp4_model.model.model.layers
    assert {layer.self_attn.spec.sliding_window for layer in layers} == {WINDOW, None}
    assert all(layer.self_attn.sinks is not None for layer in layers)
    caches = make_kv_caches(mxfp4_model, 4, BLOCK_SIZE)
    with caplog.at_level(logging.INFO, logger=fused_decode.__name__):
        fused = build_fused_decode(mxfp4_model.model, caches, TorchAttentionBackend())
    assert isinstance(fused, FusedDecode)
    assert "run the whole stack in one fused call" in caplog.text
    assert "layer by layer" not in caplog.text


@pytest.mark.parametrize("rows", [1, 5, MAX_ROWS])
def test_fused_steps_match_the_model_with_mxfp4_experts(mxfp4_model: LoadedModel, rows: int) -> None:
    # Prompts of 3 to 24 tokens: every row's sliding layers attend to its last 4 only (the shortest
    # once it has decoded two). MAX_ROWS: where the tile unit is, the matmuls of 8 rows or more on it.
    assert max(len(prompt) for prompt in PROMPTS[:rows]) > WINDOW
    _assert_steps_agree(mxfp4_model, rows)


def test_fused_steps_match_the_model_with_q8_0_experts_over_a_float16_cache(tmp_path: Path) -> None:
    _assert_steps_agree(_load(_write(tmp_path, "Q8_0", None)), 3, torch.float16)


def _fused_greedy(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Every prompt's greedy tokens, the prompts prefilled by the model and decoded together, a row
    each, through the fused stack only."""
    caches = make_kv_caches(loaded, 4 * len(prompts), BLOCK_SIZE)
    chunks = [Chunk(prompt, 0, _blocks(r)) for r, prompt in enumerate(prompts)]
    logits = run_step(loaded.model, caches, chunks)
    fused = build_fused_decode(loaded.model, caches, TorchAttentionBackend())
    assert fused is not None
    tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(new_tokens):
        for row, token in enumerate(logits.argmax(-1).tolist()):
            tokens[row].append(token)
        if step + 1 < new_tokens:
            chunks = [
                Chunk([tokens[r][-1]], len(prompt) + step, _blocks(r)) for r, prompt in enumerate(prompts)
            ]
            inputs = _inputs(chunks)
            assert fused.can_run(inputs)
            logits = fused.run(inputs)
    return tokens


def test_fused_greedy_tokens_are_the_models_and_transformers(
    mxfp4_file: Path, mxfp4_model: LoadedModel
) -> None:
    prompts = PROMPTS[:2]  # 7 and 24 tokens, decoded as one step of two rows
    fused = _fused_greedy(mxfp4_model, prompts, NEW_TOKENS)
    assert fused[0] == _fused_greedy(mxfp4_model, prompts[:1], NEW_TOKENS)[0]  # one row a step
    hf = transformers_with_the_file_weights(mxfp4_file)
    for prompt, ours in zip(prompts, fused, strict=True):
        layer_by_layer, _ = greedy_generate(mxfp4_model, prompt, NEW_TOKENS)
        theirs, _ = hf_greedy(hf, prompt, NEW_TOKENS)
        assert ours == layer_by_layer == theirs


def _without(part: str, layer: StackLayer) -> StackLayer:
    if part == "sinks":
        return replace(layer, sinks=None)
    assert layer.experts is not None
    return replace(layer, experts=replace(layer.experts, **{part: None}))


def _largest_logit_difference(loaded: LoadedModel, rows: int, steps: int) -> float:
    """The fused stack's largest logit difference from the model's over `steps` decode steps of `rows`
    requests (the tokens the model picks), as a fraction of the largest logit."""
    caches = {name: make_kv_caches(loaded, 4 * rows, BLOCK_SIZE) for name in ("model", "fused")}
    prompts = PROMPTS[:rows]
    for kv in caches.values():
        logits = run_step(
            loaded.model, kv, [Chunk(prompt, 0, _blocks(r)) for r, prompt in enumerate(prompts)]
        )
    fused = build_fused_decode(loaded.model, caches["fused"], TorchAttentionBackend())
    assert fused is not None
    largest = 0.0
    for step in range(steps):
        tokens = logits.argmax(-1).tolist()
        chunks = [Chunk([tokens[r]], len(prompt) + step, _blocks(r)) for r, prompt in enumerate(prompts)]
        logits = run_step(loaded.model, caches["model"], chunks)
        difference = (fused.run(_inputs(chunks)) - logits).abs().max() / logits.abs().max()
        largest = max(largest, float(difference))
    return largest


@pytest.mark.parametrize("part", ["sinks", "router_bias", "gate_up_bias", "down_bias"])
def test_a_stack_without_any_of_gpt_oss_parts_is_caught(
    mxfp4_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    """The checks above fail for a stack that leaves out the sinks, the router's bias or either of the
    experts' biases: each moves these logits by a hundred times their tolerance (1e-4) or more."""
    assert _largest_logit_difference(mxfp4_model, 3, 3) <= 1e-4
    layer_of = fused_decode._layer
    monkeypatch.setattr(fused_decode, "_layer", lambda *args: _without(part, layer_of(*args)))
    assert _largest_logit_difference(mxfp4_model, 3, 3) > 1e-2


def test_a_bfloat16_model_keeps_the_generic_path(mxfp4_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    """gpt-oss's norms multiply by their weight before rounding to bfloat16, RMSNorm (as the stack
    would stand for them) after: a bfloat16 model keeps its own forward."""
    loaded = _load(mxfp4_file, torch.bfloat16)
    caches = make_kv_caches(loaded, 4, BLOCK_SIZE)
    with caplog.at_level(logging.INFO, logger=fused_decode.__name__):
        assert build_fused_decode(loaded.model, caches, TorchAttentionBackend()) is None
    assert "CPU decode: layer by layer (final norm: gpt-oss's norms in torch.bfloat16" in caplog.text
