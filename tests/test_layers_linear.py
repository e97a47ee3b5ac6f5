"""Tensor-parallel linear layers: shard placement from HF tensors and the math across fake ranks."""

from __future__ import annotations

import pytest
import torch

from batchlm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    WeightShapeError,
)
from batchlm.parallel.group import TensorParallelGroup
from models_harness import run_ranks, thread_groups

GEN = torch.Generator().manual_seed(0)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def test_column_parallel_shards_concatenate_to_the_full_output() -> None:
    weight, bias, x = _randn(12, 5), _randn(12), _randn(3, 5)
    outputs = []
    for rank in range(3):
        layer = ColumnParallelLinear(5, 12, bias=True, tp=TensorParallelGroup(rank, 3))
        layer.load_weight("w", "weight", weight)
        layer.load_weight("b", "bias", bias)
        outputs.append(layer(x))
    torch.testing.assert_close(torch.cat(outputs, dim=-1), x @ weight.T + bias)


def test_column_parallel_gather_output_across_thread_ranks() -> None:
    weight, x = _randn(8, 4), _randn(2, 4)
    layers = [ColumnParallelLinear(4, 8, tp=group, gather_output=True) for group in thread_groups(2)]
    for layer in layers:
        layer.load_weight("w", "weight", weight)
    for out in run_ranks(lambda rank: layers[rank](x), 2):
        torch.testing.assert_close(out, x @ weight.T)


def test_row_parallel_all_reduce_sums_partials_and_adds_bias_once() -> None:
    weight, bias, x = _randn(6, 8), _randn(6), _randn(3, 8)
    groups = thread_groups(2)
    layers = [RowParallelLinear(8, 6, bias=True, tp=group) for group in groups]
    for layer in layers:
        layer.load_weight("w", "weight", weight)
        layer.load_weight("b", "bias", bias)
    # Each rank sees its half of the input features.
    outputs = run_ranks(lambda rank: layers[rank](x[:, rank * 4 : (rank + 1) * 4]), 2)
    for out in outputs:
        torch.testing.assert_close(out, x @ weight.T + bias)


def test_merged_gate_up_is_one_matmul_in_hf_order() -> None:
    gate, up, x = _randn(6, 4), _randn(6, 4), _randn(2, 4)
    full = MergedColumnParallelLinear(4, [6, 6])
    full.load_weight("gate", "weight", gate, 0)
    full.load_weight("up", "weight", up, 1)
    torch.testing.assert_close(full(x), torch.cat([x @ gate.T, x @ up.T], dim=-1))
    # Rank r holds [gate rows of r | up rows of r].
    rank1 = MergedColumnParallelLinear(4, [6, 6], tp=TensorParallelGroup(1, 2))
    rank1.load_weight("gate", "weight", gate, 0)
    rank1.load_weight("up", "weight", up, 1)
    torch.testing.assert_close(rank1.weight, torch.cat([gate[3:], up[3:]]))


def _qkv_weights(heads: int, kv_heads: int, head_dim: int, hidden: int):
    return (
        _randn(heads * head_dim, hidden),
        _randn(kv_heads * head_dim, hidden),
        _randn(kv_heads * head_dim, hidden),
    )


def _load_qkv(layer: QKVParallelLinear, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for shard, tensor in (("q", q), ("k", k), ("v", v)):
        layer.load_weight(f"{shard}_proj.weight", "weight", tensor, shard)


def test_qkv_fused_split_returns_q_k_v() -> None:
    q, k, v = _qkv_weights(4, 2, 3, 10)
    bias = {name: _randn(t.shape[0]) for name, t in (("q", q), ("k", k), ("v", v))}
    layer = QKVParallelLinear(10, 3, 4, 2, bias=True)
    _load_qkv(layer, q, k, v)
    for shard, b in bias.items():
        layer.load_weight(f"{shard}_proj.bias", "bias", b, shard)
    x = _randn(5, 10)
    out_q, out_k, out_v = layer.split(layer(x))
    torch.testing.assert_close(out_q, x @ q.T + bias["q"])
    torch.testing.assert_close(out_k, x @ k.T + bias["k"])
    torch.testing.assert_close(out_v, x @ v.T + bias["v"])


def test_qkv_splits_kv_heads_when_there_are_enough() -> None:
    heads, kv_heads, head_dim = 8, 4, 2
    q, k, v = _qkv_weights(heads, kv_heads, head_dim, 6)
    for rank in range(2):
        layer = QKVParallelLinear(6, head_dim, heads, kv_heads, tp=TensorParallelGroup(rank, 2))
        _load_qkv(layer, q, k, v)
        assert (layer.num_heads, layer.num_kv_heads) == (4, 2)
        out_q, out_k, out_v = layer.split(layer.weight.T)  # rows of each part, transposed
        torch.testing.assert_close(out_q.T, q[rank * 8 : (rank + 1) * 8])
        torch.testing.assert_close(out_k.T, k[rank * 4 : (rank + 1) * 4])
        torch.testing.assert_close(out_v.T, v[rank * 4 : (rank + 1) * 4])


def test_qkv_replicates_kv_heads_on_the_ranks_of_their_query_group() -> None:
    # 8 query heads, 2 KV heads, 4 ranks: ranks 0-1 serve KV head 0 (query heads 0-3), ranks 2-3 head 1.
    heads, kv_heads, head_dim = 8, 2, 2
    q, k, v = _qkv_weights(heads, kv_heads, head_dim, 6)
    for rank in range(4):
        layer = QKVParallelLinear(6, head_dim, heads, kv_heads, tp=TensorParallelGroup(rank, 4))
        _load_qkv(layer, q, k, v)
        kv_head = rank // 2
        out_q, out_k, out_v = layer.split(layer.weight.T)
        torch.testing.assert_close(out_q.T, q[rank * 4 : (rank + 1) * 4])
        torch.testing.assert_close(out_k.T, k[kv_head * 2 : (kv_head + 1) * 2])
        torch.testing.assert_close(out_v.T, v[kv_head * 2 : (kv_head + 1) * 2])


def test_shape_mismatch_names_tensor_and_both_shapes() -> None:
    layer = QKVParallelLinear(10, 3, 4, 2)
    with pytest.raises(WeightShapeError, match=r"'model.k_proj.weight'.*expects \[6, 10\].*has \[6, 9\]"):
        layer.load_weight("model.k_proj.weight", "weight", torch.zeros(6, 9), "k")
    row = RowParallelLinear(8, 6)
    with pytest.raises(WeightShapeError, match=r"expects \[6, 8\].*has \[8, 6\]"):
        row.load_weight("o_proj.weight", "weight", torch.zeros(8, 6))


def test_indivisible_sizes_are_rejected_with_the_quantity_named() -> None:
    with pytest.raises(ValueError, match="num_attention_heads"):
        QKVParallelLinear(8, 2, 6, 2, tp=TensorParallelGroup(0, 4))
    with pytest.raises(ValueError, match="input size"):
        RowParallelLinear(9, 4, tp=TensorParallelGroup(0, 2))


def test_missing_bias_parameter_is_reported() -> None:
    layer = ColumnParallelLinear(4, 4, bias=False)
    with pytest.raises(ValueError, match=r"'x.bias'.*no bias"):
        layer.load_weight("x.bias", "bias", torch.zeros(4))
