"""FP8 W8A8 and W4A16 models on CUDA against their dequantized reference: a dense checkpoint holding
exactly the weights the quantized one stands for, run in bf16 through the same engine.

- Logits of one prefill step: W4A16 multiplies the same bf16 weights as the reference (dequantized
  in registers), so only summation order differs: within 2% of the largest logit. FP8 also rounds
  each activation row to e4m3 (up to 1/16 of each value): within 8%.
- Greedy tokens through the engine (CUDA graphs on) over a prompt set must equal the reference's at
  every step where the reference's top two log-probabilities are further apart than 0.2 (W4A16) or
  0.5 (FP8); the first closer step ends the comparison for that prompt.
- The FP8 KV cache, and --quantization fp8, against the dense bf16 model with the same margin rule.
  (4-bit round-to-nearest of these random weights changes decided tokens: --quantization w4a16 is
  checked by the CPU tests' load path and by the checkpoint formats here, which share its kernel.)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from devices import require_cuda
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.gpu
require_cuda()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from batchlm import LLM, SamplingParams  # noqa: E402
from batchlm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from batchlm.models.demo import write_model_dir  # noqa: E402
from batchlm.models.loader import LoadedModel, load_model  # noqa: E402
from models_harness import Chunk, build_step  # noqa: E402
from quant_checkpoints import (  # noqa: E402
    act_order_config,
    act_ordered,
    awq_tensors,
    block_fp8_config,
    block_fp8_tensors,
    compressed_act_order_tensors,
    compressed_config,
    compressed_int4_tensors,
    fp8_tensors,
    gptq_act_order_tensors,
    gptq_tensors,
    random_int4,
    rewrite_checkpoint,
)

DEVICE = torch.device("cuda")
BLOCK = 16
GROUP = 32
PROMPTS = [
    [1, 5, 9, 14, 3, 7],
    list(range(20, 60)),
    [100, 7] * 9,
    [3, 1, 4, 1, 5, 9, 2, 6],
    list(range(300, 333)),
    [7, 11, 13] * 4,
    list(range(200, 220)),
    [42] * 10,
    [5, 6, 7, 8, 9, 10],
    list(range(150, 180, 2)),
]
FORMATS = [
    "gptq",
    "awq",
    "ct-int4",
    "gptq-act-order",
    "ct-act-order",
    "fp8-dynamic",
    "fp8-static",
    "fp8-block",
]
# Blocks that leave partial ones at the tiny model's edges (transformers' default is 128 x 128).
FP8_BLOCK = (32, 48)


def _int4(fmt: str) -> Any:
    packer = {"gptq": gptq_tensors, "awq": awq_tensors, "ct-int4": compressed_int4_tensors}.get(fmt)
    act_order_packer = {
        "gptq-act-order": gptq_act_order_tensors,
        "ct-act-order": compressed_act_order_tensors,
    }

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows, cols = weight.shape
        w = random_int4(rows, cols, GROUP, fmt.startswith("ct"), seed=rows * 31 + len(module))
        # Scales shrunk to the dense weights' size, so activations stay in a realistic range.
        w = dataclasses.replace(w, scales=(w.scales.float() * 0.2).to(torch.float16))
        if packer is None:  # groups over the inputs in a shuffled order, as act-order quantizers store
            ordered = act_ordered(w, module)
            return act_order_packer[fmt](ordered), ordered.dequantize()
        return packer(w), w.dequantize()

    return convert


def _fp8(static: bool) -> Any:
    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        parts = fp8_tensors(weight, per_tensor=static, input_scale=0.05 if static else None)
        return parts, parts["weight"].float() * parts["weight_scale"].float().reshape(-1, 1)

    return convert


def _block_fp8(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return block_fp8_tensors(weight, FP8_BLOCK)


def _config(fmt: str) -> dict[str, Any]:
    if fmt == "fp8-block":
        return block_fp8_config(FP8_BLOCK)
    if fmt.endswith("-act-order"):
        return act_order_config(fmt.removesuffix("-act-order"), GROUP)
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    if fmt == "ct-int4":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}
        return compressed_config(weights, None, "pack-quantized")
    static = fmt == "fp8-static"
    weights = {"num_bits": 8, "type": "float", "strategy": "tensor" if static else "channel"}
    inputs = {
        "num_bits": 8,
        "type": "float",
        "dynamic": not static,
        "strategy": "tensor" if static else "token",
    }
    return compressed_config(weights, inputs, "float-quantized")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """format -> (quantized checkpoint, its dequantized dense twin); "dense" -> (dense, dense)."""
    root = tmp_path_factory.mktemp("quantized")
    dense = write_model_dir(root / "dense", "llama", seed=11)
    # A 30x LM head: random weights otherwise give near-uniform next-token distributions (top-two
    # margins ~0.02), where no greedy comparison is decided.
    tensors = load_file(str(dense / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 30
    save_file(tensors, str(dense / "model.safetensors"))
    out = {"dense": (dense, dense)}
    for fmt in FORMATS:
        if fmt == "fp8-block":
            convert = _block_fp8
        else:
            convert = _fp8(fmt == "fp8-static") if fmt.startswith("fp8") else _int4(fmt)
        references = rewrite_checkpoint(dense, root / fmt, _config(fmt), convert)
        twin = root / f"{fmt}-twin"
        # An empty quantization_config reads as an unquantized checkpoint.
        rewrite_checkpoint(dense, twin, {}, lambda module, _, r=references: ({"weight": r[module]}, None))
        out[fmt] = (root / fmt, twin)
    return out


def _prefill_logits(loaded: LoadedModel) -> torch.Tensor:
    s = loaded.shape
    chunks, first = [], 0
    for prompt in PROMPTS:
        count = -(-len(prompt) // BLOCK)
        chunks.append(Chunk(prompt, 0, list(range(first, first + count))))
        first += count
    ids, positions, meta = build_step(chunks, BLOCK)
    meta = dataclasses.replace(
        meta,
        slot_mapping=meta.slot_mapping.to(DEVICE),
        query_start_loc=meta.query_start_loc.to(DEVICE),
        seq_lens=meta.seq_lens.to(DEVICE),
        block_tables=meta.block_tables.to(DEVICE),
    )
    caches = [
        torch.zeros(2, first, BLOCK, s.num_kv_heads, s.head_dim, dtype=loaded.dtype, device=DEVICE)
        for _ in range(s.num_layers)
    ]
    with torch.no_grad():
        hidden = loaded.model(ids.to(DEVICE), positions.to(DEVICE), caches, meta, TritonAttentionBackend())
        last = torch.tensor(meta.query_start_loc_cpu[1:], device=DEVICE) - 1
        return loaded.model.compute_logits(hidden[last]).float()


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_logits_match_the_dequantized_reference(
    checkpoints: dict[str, tuple[Path, Path]], fmt: str
) -> None:
    quantized_dir, twin_dir = checkpoints[fmt]
    ours = _prefill_logits(load_model(quantized_dir, torch.bfloat16, DEVICE, progress=False))
    reference = _prefill_logits(load_model(twin_dir, torch.bfloat16, DEVICE, progress=False))
    share = 0.08 if fmt.startswith("fp8") else 0.02
    assert float((ours - reference).abs().max()) <= share * float(reference.abs().max())


_GREEDY_RUNS: dict[str, list[list[tuple[int, float]]]] = {}


def _greedy(model_dir: Path, **engine: Any) -> list[list[tuple[int, float]]]:
    """Per prompt, per step: (token, margin between the top two log-probabilities); one engine per
    model and settings (CUDA graphs on, captured up to the prompt count), each run once per test run."""
    key = f"{model_dir}:{sorted(engine.items())}"
    if key not in _GREEDY_RUNS:
        _GREEDY_RUNS[key] = _run_greedy(model_dir, **engine)
    return _GREEDY_RUNS[key]


def _run_greedy(model_dir: Path, **engine: Any) -> list[list[tuple[int, float]]]:
    llm = LLM(
        model=str(model_dir),
        device="cuda",
        num_gpu_blocks_override=256,
        max_model_len=256,
        max_num_seqs=len(PROMPTS),
        **engine,
    )
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    steps = []
    for output in llm.generate(PROMPTS, params):
        completion = output.outputs[0]
        assert completion.logprobs is not None
        steps.append(
            [
                (t, lp.top[0][1] - lp.top[1][1])
                for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)
            ]
        )
    return steps


def _assert_same_decided_tokens(
    ours: list[list[tuple[int, float]]], reference: list[list[tuple[int, float]]], margin: float
) -> int:
    compared = 0
    for mine, theirs in zip(ours, reference, strict=True):
        for (token, _), (expected, gap) in zip(mine, theirs, strict=True):
            if gap <= margin:
                break
            assert token == expected
            compared += 1
    return compared


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_tokens_match_the_dequantized_reference(
    checkpoints: dict[str, tuple[Path, Path]], fmt: str
) -> None:
    quantized_dir, twin_dir = checkpoints[fmt]
    margin = 0.5 if fmt.startswith("fp8") else 0.2
    compared = _assert_same_decided_tokens(_greedy(quantized_dir), _greedy(twin_dir), margin)
    assert compared >= 20  # the margin rule must leave a real comparison


@pytest.mark.parametrize(
    ("engine", "margin"),
    [({"kv_cache_dtype": "fp8"}, 0.5), ({"quantization": "fp8"}, 0.5)],
)
def test_fp8_cache_and_fp8_at_load_follow_the_bf16_model(
    checkpoints: dict[str, tuple[Path, Path]], engine: dict[str, Any], margin: float
) -> None:
    dense, _ = checkpoints["dense"]
    compared = _assert_same_decided_tokens(_greedy(dense, **engine), _greedy(dense), margin)
    assert compared >= 10


def test_fp8_cache_doubles_the_blocks_of_a_memory_budget(checkpoints: dict[str, tuple[Path, Path]]) -> None:
    from batchlm.runner.kv_cache import bytes_per_block

    loaded = load_model(checkpoints["dense"][0], torch.bfloat16, DEVICE, progress=False)
    wide = bytes_per_block(loaded.shape, BLOCK, torch.bfloat16)
    assert bytes_per_block(loaded.shape, BLOCK, torch.float8_e4m3fn) * 2 == wide
