"""The weight-format seam (layers/quantization/): quantized tensors through the layers' loaders, TP
splits of raw blocks, and the method registry that decides per layer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

from batchlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from batchlm.layers.linear import QKVParallelLinear, RowParallelLinear
from batchlm.layers.quantization import registry
from batchlm.layers.quantization.base import QuantizedColumns, QuantizedTensor, narrow_cols
from batchlm.layers.quantization.dense import DEQUANTIZE, DenseLinearMethod
from batchlm.layers.quantization.forms import quantize_fp8_rows
from batchlm.layers.quantization.fp8 import FP8
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.layers.quantization.registry import (
    DENSE_FORMAT,
    FP8_QTYPE,
    GGUF_FORMAT,
    WeightSpec,
    choose_linear_method,
)
from batchlm.models.llama import LlamaMLP
from batchlm.models.model_config import read_model_config
from batchlm.models.random_model import TINY_CONFIG
from batchlm.models.registry import get_model_class
from batchlm.models.weight_methods import assign_weight_methods
from batchlm.parallel.group import TensorParallelGroup

GEN = torch.Generator().manual_seed(0)


def q8_0(values: torch.Tensor) -> QuantizedTensor:
    qtype = GGMLQuantizationType.Q8_0
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    data = torch.from_numpy(quantize(values.numpy(), qtype))
    return QuantizedTensor(qtype.name, data, values.shape[1], block_size, block_bytes)


def test_dequantize_gives_the_gguf_reference_values_and_slices_rows_and_blocks() -> None:
    weight = torch.randn(6, 64, generator=GEN)
    tensor = q8_0(weight)
    assert tensor.shape == (6, 64) and tensor.data.dtype == torch.uint8
    full = tensor.dequantize()
    torch.testing.assert_close(full, weight, atol=0.05, rtol=0.05)  # Q8_0's rounding
    torch.testing.assert_close(tensor.narrow_rows(2, 3).dequantize(), full[2:5])
    torch.testing.assert_close(tensor.narrow_cols(32, 32).dequantize(), full[:, 32:])
    with pytest.raises(ValueError, match="32-column blocks"):
        tensor.narrow_cols(16, 32)


def test_quantized_shards_land_in_the_fused_rows_of_each_rank() -> None:
    q, k, v = (torch.randn(rows, 32, generator=GEN) for rows in (16, 8, 8))
    for rank in range(2):
        tp = TensorParallelGroup(rank, 2)
        quantized, dense = (QKVParallelLinear(32, 4, 4, 2, tp=tp) for _ in range(2))
        quantized.set_method(DEQUANTIZE)
        for shard, tensor in (("q", q), ("k", k), ("v", v)):
            quantized.load_weight(f"{shard}_proj.weight", "weight", q8_0(tensor), shard)
            dense.load_weight(f"{shard}_proj.weight", "weight", q8_0(tensor).dequantize(), shard)
        torch.testing.assert_close(quantized.weight, dense.weight, atol=0, rtol=0)


def test_row_parallel_takes_whole_blocks_of_columns() -> None:
    weight = torch.randn(8, 64, generator=GEN)
    expected = q8_0(weight).dequantize()
    layer = RowParallelLinear(64, 8, tp=TensorParallelGroup(1, 2))
    layer.set_method(DEQUANTIZE)
    layer.load_weight("o_proj.weight", "weight", q8_0(weight))
    torch.testing.assert_close(layer.weight, expected[:, 32:], atol=0, rtol=0)
    inside_blocks = RowParallelLinear(64, 8, tp=TensorParallelGroup(1, 4))  # 16 of each 32-value block
    inside_blocks.set_method(DEQUANTIZE)
    inside_blocks.load_weight("o_proj.weight", "weight", q8_0(weight))
    torch.testing.assert_close(inside_blocks.weight, expected[:, 16:32], atol=0, rtol=0)


def test_a_split_inside_blocks_keeps_the_covering_blocks() -> None:
    tensor = q8_0(torch.randn(6, 128, generator=GEN))
    full = tensor.dequantize()
    window = narrow_cols(tensor, 48, 32)  # the second half of block 1, the first half of block 2
    assert isinstance(window, QuantizedColumns) and window.qtype == "Q8_0" and window.shape == (6, 32)
    assert window.blocks.cols == 64 and window.start == 16
    torch.testing.assert_close(window.dequantize(), full[:, 48:80], atol=0, rtol=0)
    torch.testing.assert_close(window.narrow_rows(1, 2).dequantize(), full[1:3, 48:80], atol=0, rtol=0)
    torch.testing.assert_close(window.narrow_cols(16, 16).dequantize(), full[:, 64:80], atol=0, rtol=0)
    assert isinstance(narrow_cols(tensor, 32, 64), QuantizedTensor)  # on block edges: a plain slice


def test_dense_method_refuses_a_quantized_tensor_by_name() -> None:
    layer = RowParallelLinear(64, 8)
    with pytest.raises(ValueError, match=r"'o_proj.weight' is Q8_0-quantized"):
        layer.load_weight("o_proj.weight", "weight", q8_0(torch.randn(8, 64, generator=GEN)))


def test_tied_head_follows_its_embeddings_method_and_storage() -> None:
    embed, head = VocabParallelEmbedding(10, 32), ParallelLMHead(10, 32)
    head.tie_to(embed)
    embed.set_method(DEQUANTIZE)
    head.tie_to(embed)
    table = torch.randn(10, 32, generator=GEN)
    embed.load_weight("embed_tokens.weight", "weight", q8_0(table))
    assert head.method is DEQUANTIZE and head.weight is embed.weight
    hidden = torch.randn(3, 32, generator=GEN)
    torch.testing.assert_close(head.compute_logits(hidden), hidden @ q8_0(table).dequantize().T)
    with pytest.raises(ValueError, match="follows its embedding"):
        head.set_method(DEQUANTIZE)


class RecordingMethod(DenseLinearMethod):
    """A format of its own: records the specs it was chosen for."""

    def __init__(self) -> None:
        self.specs: list[WeightSpec] = []


@pytest.fixture
def recording() -> Iterator[RecordingMethod]:
    method = RecordingMethod()

    def choose(spec: WeightSpec) -> RecordingMethod | None:
        if spec.format == GGUF_FORMAT and "Q4_K" in spec.qtypes:
            method.specs.append(spec)
            return method
        return None

    registry.METHOD_CHOOSERS.insert(0, choose)
    yield method
    registry.METHOD_CHOOSERS.remove(choose)


def test_a_registered_chooser_gets_each_layer_with_its_tensor_types(recording: RecordingMethod) -> None:
    config = SimpleNamespace(**{**TINY_CONFIG, "tie_word_embeddings": True})
    model = get_model_class("LlamaForCausalLM")(read_model_config(config))
    layer0 = "model.layers.0"
    qtypes = {
        f"{layer0}.self_attn.q_proj.weight": "Q4_K",
        f"{layer0}.self_attn.k_proj.weight": "Q4_K",
        f"{layer0}.self_attn.v_proj.weight": "Q6_K",
        "model.embed_tokens.weight": "Q4_K",
    }
    chosen = assign_weight_methods(model, GGUF_FORMAT, qtypes, torch.device("cpu"), torch.float32)
    assert chosen["RecordingMethod"] == 2
    assert [(spec.role, spec.qtypes) for spec in recording.specs] == [
        ("embedding", ("Q4_K",)),
        ("linear", ("Q4_K", "Q4_K", "Q6_K")),
    ]
    assert model.lm_head.method is recording and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].mlp.down_proj.method is DEQUANTIZE
    dense_spec = WeightSpec("dense", (), "linear", torch.device("cpu"), torch.float32)
    assert isinstance(choose_linear_method(dense_spec), DenseLinearMethod)


class SiluInProductMethod(DenseLinearMethod):
    """A method whose product makes silu(gate) * up itself (as the GPU's one-row GEMVs do)."""

    def __init__(self) -> None:
        self.gated_calls = 0

    def apply_silu_gated(
        self, layer: MethodLayer, gate_up: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        self.gated_calls += 1
        gate, up = gate_up.chunk(2, dim=-1)
        return self.apply(layer, torch.nn.functional.silu(gate) * up, bias)


def test_a_gated_mlp_hands_its_down_projection_gate_and_up_where_the_method_takes_them() -> None:
    config = read_model_config(SimpleNamespace(**TINY_CONFIG))
    mlp = LlamaMLP(config, bias=True, tp=TensorParallelGroup(0, 1))
    for param in mlp.parameters():
        torch.nn.init.normal_(param, std=0.1, generator=GEN)
    x = torch.randn(3, config.hidden_size, generator=GEN)
    unfused = mlp(x)  # the dense method has no such path: SiLU-and-mul, then the product
    assert DenseLinearMethod().apply_silu_gated(mlp.down_proj, x, None) is None
    weight = mlp.down_proj.weight.detach().clone()
    method = SiluInProductMethod()
    mlp.down_proj.set_method(method)
    mlp.down_proj.load_weight("w", "weight", weight)
    torch.testing.assert_close(mlp(x), unfused)
    assert method.gated_calls == 1


def test_fp8_linears_on_a_gpu_without_fp8_tensor_cores_load_dequantized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An FP8 checkpoint on an A100: its linears take the dense method, dequantized as they load (the
    FP8 W8A8 method needs FP8 tensor cores); --quantization fp8 still asks for the FP8 method, which
    refuses such a GPU by name."""
    spec = WeightSpec(DENSE_FORMAT, (FP8_QTYPE,), "linear", torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(registry, "has_fp8_tensor_cores", lambda device: False)
    assert choose_linear_method(spec) is DEQUANTIZE
    assert choose_linear_method(replace(spec, qtypes=(), quantization="fp8")) is FP8
    monkeypatch.setattr(registry, "has_fp8_tensor_cores", lambda device: True)
    assert choose_linear_method(spec) is FP8
    weight = quantize_fp8_rows(torch.randn(16, 64, generator=GEN))
    for rank in range(2):  # a rank's columns, each row's scale with them
        layer = RowParallelLinear(64, 16, tp=TensorParallelGroup(rank, 2))
        layer.set_method(DEQUANTIZE)
        layer.load_weight("o_proj.weight", "weight", weight)
        assert torch.equal(layer.weight, weight.dequantize()[:, 32 * rank : 32 * (rank + 1)])
