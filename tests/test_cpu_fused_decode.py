"""The fused CPU decode path (runner/fused_decode.py, kernels/cpu_decode_stack.c) against the model's
own forward on the same quantized weights: logits and the KV cache it writes, over several decode
steps of one to MAX_ROWS requests with contexts crossing block edges; and which steps and models
take it.

Tolerance: both paths run the same quantized matmuls; they differ in float32 summation order (norms,
attention) and the exp approximation, and those roundings can move an activation code by one step:
measured up to 3e-5 of the largest cached value. The test allows 1e-4 of the largest logit and of
the largest cached value.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.kernels import cpu_quant, quant_panels
from batchlm.kernels.cpu_decode_stack import stack_library
from batchlm.layers.quantization.cpu_quantized import store
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.random_model import write_random_model
from batchlm.runner import fused_decode
from batchlm.runner.fused_decode import MAX_ROWS, MAX_VERIFY_ROWS, FusedDecode, build_fused_decode
from batchlm.runner.inputs import StepInputs
from cpu_isa import kernel_path
from gguf_builder import write_tiny_gguf
from models_harness import Chunk, build_step, make_kv_caches, run_step
from test_gguf_loading import MIXTRAL, PHI4_MINI, QWEN3_MOE
from test_models_granite import GRANITE
from test_models_ministral3 import write_model

pytestmark = pytest.mark.skipif(stack_library() is None, reason="no AVX2 CPU or C compiler here")
CPU = torch.device("cpu")
BLOCK_SIZE = 16
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11] * 3 + list(range(100, 121)), [9] * 15, [1, 2, 3, 4, 5, 6]]
# Up to MAX_ROWS requests at once, of lengths 3 to 18.
PROMPTS += [[(7 * r + j) % 200 + 3 for j in range(3 + r % 16)] for r in range(len(PROMPTS), MAX_ROWS)]


def _model(
    tmp_path: Path,
    qtype: str,
    tied: bool,
    model_type: str = "llama",
    overrides: dict[str, Any] | None = None,
    tensor_types: dict[str, str] | None = None,
) -> LoadedModel:
    gguf = write_tiny_gguf(
        tmp_path / "tiny.gguf", model_type, qtype, tied, overrides=overrides, tensor_types=tensor_types
    )
    return load_model(prepare_gguf_model_dir(gguf, tmp_path / "c"), torch.float32, CPU, progress=False)


def _inputs(chunks: list[Chunk]) -> StepInputs:
    input_ids, positions, meta = build_step(chunks, BLOCK_SIZE)
    return StepInputs(
        input_ids, positions, meta, torch.arange(len(chunks)), [str(i) for i in range(len(chunks))]
    )


def _blocks(request: int) -> list[int]:
    return [4 * request + i for i in range(4)]


def _assert_steps_agree(
    loaded: LoadedModel, rows: int, cache_dtype: torch.dtype = torch.float32, tolerance: float = 1e-4
) -> None:
    reference_caches = make_kv_caches(loaded, 4 * len(PROMPTS), BLOCK_SIZE, cache_dtype)
    fused_caches = make_kv_caches(loaded, 4 * len(PROMPTS), BLOCK_SIZE, cache_dtype)
    fused = build_fused_decode(loaded.model, fused_caches, TorchAttentionBackend())
    assert isinstance(fused, FusedDecode)
    prompts = PROMPTS[:rows]
    chunks = [Chunk(prompt, 0, _blocks(r)) for r, prompt in enumerate(prompts)]
    for caches in (reference_caches, fused_caches):
        logits = run_step(loaded.model, caches, chunks)
    lengths = [len(prompt) for prompt in prompts]
    for _ in range(12):  # the 15-token prompt crosses a block edge on its second step
        tokens = logits.argmax(-1).tolist()
        chunks = [Chunk([tokens[r]], lengths[r], _blocks(r)) for r in range(rows)]
        logits = run_step(loaded.model, reference_caches, chunks)
        inputs = _inputs(chunks)
        assert fused.can_run(inputs)
        ours = fused.run(inputs)
        assert (ours - logits).abs().max() <= tolerance * logits.abs().max()
        lengths = [n + 1 for n in lengths]
    # A half cache may round a value the two paths differ in last bits to neighbouring halves: one step.
    cache_tolerance = max(tolerance, torch.finfo(cache_dtype).eps)
    for theirs, mine in zip(reference_caches, fused_caches, strict=True):
        assert (theirs.float() - mine.float()).abs().max() <= cache_tolerance * theirs.float().abs().max()


@pytest.mark.parametrize(("qtype", "tied"), [("Q4_0", True), ("Q8_0", False), ("Q4_K", True)])
def test_fused_steps_match_the_model(tmp_path: Path, qtype: str, tied: bool) -> None:
    _assert_steps_agree(_model(tmp_path, qtype, tied), MAX_ROWS)


@pytest.mark.parametrize("rows", [1, MAX_ROWS])
def test_fused_steps_over_layers_packed_in_parts_match_the_model(tmp_path: Path, rows: int) -> None:
    # As a Q4_K_M file: the values (and the down projections) in Q6_K, read as 8-bit codes, beside
    # 4-bit queries and keys; q/k/v packs as two parts.
    loaded = _model(tmp_path, "Q4_K", True, tensor_types={"attn_v.weight": "Q6_K", "ffn_down.weight": "Q6_K"})
    qkv = store(loaded.model.model.layers[0].self_attn.qkv_proj).finish()
    assert isinstance(qkv, quant_panels.PartedWeight)
    assert [(part.bits, part.out_features) for part in qkv.parts] == [(4, 384), (8, 128)]
    _assert_steps_agree(loaded, rows)


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_fused_steps_match_the_model_at_fewer_rows(tmp_path: Path, rows: int) -> None:
    _assert_steps_agree(_model(tmp_path, "Q4_1", True), rows)


@pytest.mark.parametrize(("qtype", "model_type", "rows"), [("Q4_K", "llama", MAX_ROWS), ("Q8_0", "qwen3", 3)])
def test_fused_steps_over_a_float16_cache_match_the_model(
    tmp_path: Path, qtype: str, model_type: str, rows: int
) -> None:
    # --kv-cache-dtype fp16: the stack stores and reads half values, and attends with a row's new key
    # and value rounded as the cache holds them, as the model's path (which reads them back) does.
    _assert_steps_agree(_model(tmp_path, qtype, True, model_type), rows, torch.float16)


def test_fused_steps_saturate_outsized_keys_in_a_float16_cache_as_the_model_does(tmp_path: Path) -> None:
    # Qwen3's key norm scaled past float16's range: both paths store those keys as +-65504, and the
    # stack attends with its new keys saturated alike, so the logits still agree and stay finite.
    loaded = _model(tmp_path, "Q8_0", True, "qwen3")
    norm = loaded.model.model.layers[0].self_attn.k_norm
    norm.weight.data.mul_(1e6)
    _assert_steps_agree(loaded, 3, torch.float16)


def test_fused_steps_with_llama3_rope_scaling(tmp_path: Path) -> None:
    # A Llama 3.x GGUF (rope_freqs): a band these prompts' positions reach, so the scaling shows.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    overrides = {"rope_scaling": {**scaling, "original_max_position_embeddings": 64}}
    loaded = _model(tmp_path, "Q4_K", False, overrides=overrides)
    assert loaded.model.config.layers[0].rope.params["rope_type"] == "llama3"
    _assert_steps_agree(loaded, 3)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_fused_steps_with_qwen3_head_norms(tmp_path: Path, qtype: str) -> None:
    # Qwen3's per-head RMSNorm of the queries and keys, before their rotation.
    loaded = _model(tmp_path, qtype, True, "qwen3")
    assert loaded.model.model.layers[0].self_attn.q_norm is not None
    _assert_steps_agree(loaded, 3)


@pytest.mark.parametrize("rows", [1, 5])
def test_fused_steps_give_the_same_bits_on_any_thread_count(tmp_path: Path, rows: int) -> None:
    # Threads split output rows and attention items, never a sum: one thread and three give the same
    # logits and caches (one row over three threads attends a query head an item, over one a KV group).
    loaded = _model(tmp_path, "Q4_K", True)
    prompts = PROMPTS[:rows]
    results = []
    threads = torch.get_num_threads()
    try:
        for team in (1, 3):
            torch.set_num_threads(team)
            caches = make_kv_caches(loaded, 4 * len(PROMPTS), BLOCK_SIZE)
            chunks = [Chunk(prompt, 0, _blocks(r)) for r, prompt in enumerate(prompts)]
            tokens = run_step(loaded.model, caches, chunks).argmax(-1).tolist()
            fused = build_fused_decode(loaded.model, caches, TorchAttentionBackend())
            assert isinstance(fused, FusedDecode)
            steps = []
            for step in range(3):
                chunks = [
                    Chunk([tokens[r]], len(prompt) + step, _blocks(r)) for r, prompt in enumerate(prompts)
                ]
                steps.append(fused.run(_inputs(chunks)))
                tokens = steps[-1].argmax(-1).tolist()
            results.append((steps, caches))
    finally:
        torch.set_num_threads(threads)
    (one_steps, one_caches), (three_steps, three_caches) = results
    assert all(torch.equal(a, b) for a, b in zip(one_steps, three_steps, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(one_caches, three_caches, strict=True))


@pytest.mark.skipif(not cpu_quant.use_amx(), reason="no AMX tiles on this CPU (or OS)")
@pytest.mark.parametrize(("rows", "model_type"), [(8, "qwen3"), (21, "qwen3"), (MAX_ROWS, "qwen3_moe")])
def test_fused_steps_on_amx_tiles_give_the_vnni_paths_bits(
    tmp_path: Path, rows: int, model_type: str
) -> None:
    # Steps of 8 rows or more run their 8-bit matmuls on the tile unit, of 16 or more their 4-bit ones:
    # the same logits and caches, bit for bit, as on AVX-512 VNNI (21 rows: the tiles' last rows are
    # padding; 32 rows over 8 experts, 2 a row: experts of 8 rows or more, and fewer).
    overrides = QWEN3_MOE if model_type == "qwen3_moe" else None
    loaded = _model(tmp_path, "Q4_K", True, model_type, overrides)
    prompts = PROMPTS[:rows]
    results = {}
    for path in ("auto", "avx512"):
        caches = make_kv_caches(loaded, 4 * len(PROMPTS), BLOCK_SIZE)
        run_step(loaded.model, caches, [Chunk(prompt, 0, _blocks(r)) for r, prompt in enumerate(prompts)])
        fused = build_fused_decode(loaded.model, caches, TorchAttentionBackend())
        assert isinstance(fused, FusedDecode)
        tokens = [3 + r for r in range(rows)]
        steps = []
        with kernel_path(path):
            assert cpu_quant.quant_isa() == (cpu_quant.ISA_AMX if path == "auto" else cpu_quant.ISA_AVX512)
            for step in range(2):
                chunks = [
                    Chunk([tokens[r]], len(prompt) + step, _blocks(r)) for r, prompt in enumerate(prompts)
                ]
                steps.append(fused.run(_inputs(chunks)))
                tokens = steps[-1].argmax(-1).tolist()
        results[path] = (steps, caches)
    (tile_steps, tile_caches), (vnni_steps, vnni_caches) = results["auto"], results["avx512"]
    assert all(torch.equal(a, b) for a, b in zip(tile_steps, vnni_steps, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(tile_caches, vnni_caches, strict=True))


@pytest.mark.parametrize(
    ("model_type", "qtype", "overrides", "rows"),
    [
        ("qwen3_moe", "Q4_K", QWEN3_MOE, MAX_ROWS),
        ("qwen3_moe", "Q8_0", {**QWEN3_MOE, "norm_topk_prob": False, "num_experts_per_tok": 3}, 1),
        ("mixtral", "Q8_0", MIXTRAL, 3),
    ],
)
def test_fused_steps_through_experts_match_the_model(
    tmp_path: Path, model_type: str, qtype: str, overrides: dict[str, Any], rows: int
) -> None:
    # Each row's routing (softmax, top k, Qwen3-MoE's optional rescaling; Mixtral's always) and the
    # routed experts run inside the stack, as the model's layer-by-layer path runs them.
    loaded = _model(tmp_path, qtype, True, model_type, overrides)
    _assert_steps_agree(loaded, rows)


def test_fused_steps_over_dense_and_expert_layers_match_the_model(tmp_path: Path) -> None:
    # Qwen3-MoE with a dense MLP in layer 1 (mlp_only_layers), every linear and expert quantized at
    # load (--quantization int8).
    config = {**QWEN3_MOE, "moe_intermediate_size": 64, "mlp_only_layers": [1]}
    path = write_random_model(tmp_path, "qwen3_moe", config, seed=5)
    loaded = load_model(path, torch.float32, CPU, progress=False, quantization="int8")
    kinds = [type(layer.mlp).__name__ for layer in loaded.model.model.layers]
    assert "LlamaMLP" in kinds and "SparseMoeBlock" in kinds
    _assert_steps_agree(loaded, 5)


# Gemma 3 as its 4B-27B are: 5 of 6 layers attend within a window (8 tokens here, so the prompts reach
# past it) at their own RoPE base, the global ones at a scaled one.
GEMMA3 = {
    "num_hidden_layers": 6,
    "sliding_window": 8,
    "query_pre_attn_scalar": 64,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
}


@pytest.mark.parametrize(
    ("qtype", "rows", "cache_dtype"), [("Q4_K", MAX_ROWS, torch.float32), ("Q8_0", 3, torch.float16)]
)
def test_fused_steps_of_gemma3_match_the_model(
    tmp_path: Path, qtype: str, rows: int, cache_dtype: torch.dtype
) -> None:
    # Gemma's norms (1 + weight) before and after each block, GELU (tanh) gating, per-head q/k norms,
    # the scaled embedding, per-layer windows and RoPE tables. This random model is ten times as
    # sensitive as the others to the paths' last-bit differences: scaling its embeddings by 1 + 1e-7
    # moves its own Q8_0 logits by 2.5e-4 of the largest. A missing norm, window or RoPE base moves
    # them by a large fraction of it.
    loaded = _model(tmp_path, qtype, True, "gemma3_text", GEMMA3)
    layers = loaded.model.model.layers
    assert {layer.self_attn.spec.sliding_window for layer in layers} == {8, None}
    assert len({id(layer.self_attn.rotary_emb) for layer in layers}) == 2
    _assert_steps_agree(loaded, rows, cache_dtype, tolerance=1e-3)


def test_fused_steps_of_gemma2_match_the_model(tmp_path: Path) -> None:
    # Gemma 2: soft-capped attention scores in the stack, the capped logits after it; every other
    # layer within a window.
    caps = {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 30.0}  # a cap these scores reach
    overrides = {**caps, "sliding_window": 8, "query_pre_attn_scalar": 64}
    loaded = _model(tmp_path, "Q8_0", True, "gemma2", overrides)
    assert loaded.model.model.layers[0].self_attn.spec.logit_softcap == 1.0
    _assert_steps_agree(loaded, 3, tolerance=1e-3)


def test_fused_steps_with_a_sliding_window_match_the_model(tmp_path: Path) -> None:
    # Mistral's window over every layer (its checkpoint quantized at load): the 24-token prompt's rows
    # attend to their last 8 tokens.
    path = write_random_model(tmp_path, "mistral", {"sliding_window": 8}, seed=7)
    loaded = load_model(path, torch.float32, CPU, progress=False, quantization="int8")
    assert loaded.model.model.layers[0].self_attn.spec.sliding_window == 8
    _assert_steps_agree(loaded, 4)


@pytest.mark.parametrize("overrides", [{"pad_token_id": 0}, PHI4_MINI], ids=["phi3", "phi4-mini"])
def test_fused_steps_of_phi3_match_the_model(tmp_path: Path, overrides: dict[str, Any]) -> None:
    # Phi-4-mini's shape: LongRoPE over half of each head, a window; fused q/k/v and gate/up in the file.
    loaded = _model(tmp_path, "Q8_0", True, "phi3", overrides)
    rope = loaded.model.model.layers[0].self_attn.rotary_emb
    assert (rope.rotary_dim < rope.head_dim) == ("rope_parameters" in overrides)
    _assert_steps_agree(loaded, 3)


def test_fused_steps_over_layers_without_rope_match_the_model(tmp_path: Path) -> None:
    # SmolLM3 as llama.cpp runs it: its fourth layer leaves queries and keys unrotated.
    loaded = _model(tmp_path, "Q8_0", True, "smollm3", {"num_hidden_layers": 4, "pad_token_id": 0})
    assert [layer.self_attn.rotates for layer in loaded.model.model.layers] == [True, True, True, False]
    _assert_steps_agree(loaded, 3)


def test_fused_steps_of_glm4_match_the_model(tmp_path: Path) -> None:
    # GLM-4 as llama.cpp writes it: half of each head rotating (its interleaved pairs reordered at
    # load), q/k/v biases, and the attention's and the MLP's outputs normed (Gemma's four norms, plain
    # RMS ones).
    loaded = _model(tmp_path, "Q8_0", False, "glm4", {"pad_token_id": 0})
    assert {layer.self_attn.rotary_emb.rotary_dim for layer in loaded.model.model.layers} == {32}
    _assert_steps_agree(loaded, 3)


def test_fused_steps_with_qkv_biases(tmp_path: Path) -> None:
    _assert_steps_agree(_model(tmp_path, "Q8_0", False, "qwen2"), 2)


def test_only_small_pure_decode_steps_take_it(tmp_path: Path) -> None:
    loaded = _model(tmp_path, "Q4_0", True)
    fused = build_fused_decode(loaded.model, make_kv_caches(loaded, 8, BLOCK_SIZE), TorchAttentionBackend())
    assert fused is not None
    assert not fused.can_run(_inputs([Chunk([1, 2, 3], 0, [0])]))  # a prefill
    assert not fused.can_run(_inputs([Chunk([4], 3, [0]), Chunk([1, 2], 0, [1])]))  # decode + prefill
    many = [Chunk([4], 3, [r]) for r in range(MAX_ROWS + 1)]
    assert not fused.can_run(_inputs(many))
    assert fused.can_run(_inputs(many[:MAX_ROWS]))
    # A verify chunk laid out as decode rows (runner/decode_rows.py) may have up to MAX_VERIFY_ROWS.
    verify = [Chunk([4], 3 + row, [0, 1, 2]) for row in range(MAX_VERIFY_ROWS + 1)]
    assert fused.can_run(replace(_inputs(verify[:MAX_VERIFY_ROWS]), has_drafts=True))
    assert not fused.can_run(replace(_inputs(verify), has_drafts=True))


def test_models_off_the_kernels_keep_the_generic_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense = load_model(write_random_model(tmp_path, "llama", seed=3), torch.float32, CPU, progress=False)
    assert (
        build_fused_decode(dense.model, make_kv_caches(dense, 4, BLOCK_SIZE), TorchAttentionBackend()) is None
    )
    quantized = _model(tmp_path / "q", "Q4_0", True)
    caches = make_kv_caches(quantized, 4, BLOCK_SIZE)
    monkeypatch.setenv(fused_decode.DISABLE_ENV, "0")
    assert build_fused_decode(quantized.model, caches, TorchAttentionBackend()) is None
    monkeypatch.delenv(fused_decode.DISABLE_ENV)
    # Head norms the stack would not compute as the model does (here another epsilon) keep it off.
    qwen3 = _model(tmp_path / "q3", "Q4_0", True, "qwen3")
    caches = make_kv_caches(qwen3, 4, BLOCK_SIZE)
    assert build_fused_decode(qwen3.model, caches, TorchAttentionBackend()) is not None
    qwen3.model.model.layers[1].self_attn.k_norm.eps = 1e-3
    assert build_fused_decode(qwen3.model, caches, TorchAttentionBackend()) is None


@pytest.mark.parametrize(
    ("model_type", "overrides", "reason"),
    [
        # Llama's model and blocks, subclassed to scale the embedding and the residual adds.
        ("granite", GRANITE, "a decoder stack the fused call does not compute (GraniteModel)"),
        ("olmo2", {"pad_token_id": 0}, "not a Llama- or Gemma-style model"),
        # Norms after the attention and the MLP only: the stack norms each block's input.
        (
            "exaone4",
            {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
            "not a Llama- or Gemma-style model",
        ),
    ],
)
def test_families_whose_blocks_compute_otherwise_keep_the_generic_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, model_type: str, overrides: dict[str, Any], reason: str
) -> None:
    """Every linear of these models runs on the quantized kernels, but the stack would compute their
    blocks as Llama's (wrong logits): each keeps the model's own forward, the log says why."""
    loaded = _model(tmp_path, "Q8_0", False, model_type, overrides)
    caches = make_kv_caches(loaded, 4, BLOCK_SIZE)
    with caplog.at_level(logging.INFO, logger=fused_decode.__name__):
        assert build_fused_decode(loaded.model, caches, TorchAttentionBackend()) is None
    assert f"CPU decode: layer by layer ({reason}" in caplog.text


@pytest.mark.parametrize("multimodal", [False, True], ids=["causal-lm", "multimodal"])
def test_ministral3_keeps_the_generic_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, multimodal: bool
) -> None:
    """Llama's model and blocks, but queries scaled by position, which the stack (computing q itself)
    would leave out: every linear quantized at load, the model keeps its own forward."""
    loaded = load_model(
        write_model(tmp_path, multimodal, seed=9), torch.float32, CPU, progress=False, quantization="int8"
    )
    caches = make_kv_caches(loaded, 4, BLOCK_SIZE)
    with caplog.at_level(logging.INFO, logger=fused_decode.__name__):
        assert build_fused_decode(loaded.model, caches, TorchAttentionBackend()) is None
    assert "CPU decode: layer by layer (attention the fused call does not compute (Ministral3Attention))" in (
        caplog.text
    )


def test_fused_steps_of_seed_oss_match_the_model(tmp_path: Path) -> None:
    # Seed-OSS as llama.cpp writes it: Llama's block with q/k/v, o and MLP biases (each its own config
    # field, read from the tensors the file holds).
    overrides = {"attention_bias": True, "attention_out_bias": True, "mlp_bias": True}
    loaded = _model(tmp_path, "Q8_0", False, "seed_oss", overrides)
    attention = loaded.model.model.layers[0].self_attn
    assert attention.qkv_proj.bias is not None and attention.o_proj.bias is not None
    _assert_steps_agree(loaded, 3)


@torch.inference_mode()
@pytest.mark.parametrize(
    ("model_type", "qtype", "overrides", "tolerance"),
    [
        ("llama", "Q4_1", None, 1e-4),
        ("qwen3_moe", "Q4_K", QWEN3_MOE, 1e-4),
        ("gemma3_text", "Q8_0", GEMMA3, 1e-3),
    ],
)
def test_verify_rows_are_the_decodes_of_their_tokens(
    tmp_path: Path, model_type: str, qtype: str, overrides: dict[str, Any] | None, tolerance: float
) -> None:
    """A verify chunk of 1 + 7 tokens, crossing a block edge, as decode rows of one request through the
    fused stack (every row's key stored before any row attends): bit for bit the logits and cache of
    decoding its tokens one at a time through the stack, and within tolerance of the model's own
    forward over the chunk. With experts, the rows route apart; under Gemma 3's 8-token windows, each
    row attends to its own last 8."""
    loaded = _model(tmp_path, qtype, True, model_type, overrides)
    prompt, blocks = PROMPTS[2], _blocks(0)  # 15 tokens: the chunk's positions 15..22 cross 16
    caches = {name: make_kv_caches(loaded, 4, BLOCK_SIZE) for name in ("rows", "one by one", "model")}
    for kv in caches.values():
        logits = run_step(loaded.model, kv, [Chunk(prompt, 0, blocks)])
    tokens = [int(logits.argmax()), 40, 41, 42, 43, 44, 45, 46]
    rows = [Chunk([token], len(prompt) + i, blocks) for i, token in enumerate(tokens)]
    fused = build_fused_decode(loaded.model, caches["rows"], TorchAttentionBackend())
    assert fused is not None
    inputs = replace(_inputs(rows), has_drafts=True)
    assert fused.can_run(inputs)
    together = fused.run(inputs)
    one_by_one = build_fused_decode(loaded.model, caches["one by one"], TorchAttentionBackend())
    assert one_by_one is not None
    alone = torch.cat([one_by_one.run(_inputs([row])) for row in rows])
    assert torch.equal(together, alone)
    for mine, theirs in zip(caches["rows"], caches["one by one"], strict=True):
        assert torch.equal(mine, theirs)
    input_ids, positions, meta = build_step([Chunk(tokens, len(prompt), blocks)], BLOCK_SIZE)
    hidden = loaded.model(input_ids, positions, caches["model"], meta, TorchAttentionBackend())
    model_logits = loaded.model.compute_logits(hidden)
    assert (together - model_logits).abs().max() <= tolerance * model_logits.abs().max()
