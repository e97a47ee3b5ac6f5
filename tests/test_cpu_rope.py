"""RoPE in one C pass (kernels/cpu_rope.py) gives torch's rotation bit for bit: on the adjacent query and
key heads of a fused qkv projection, on separate tensors, and through RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from batchlm.kernels.cpu_rope import rope_library, rotate_native
from batchlm.layers import rotary
from batchlm.layers.rotary import RotaryEmbedding, _rotate, build_cos_sin_cache

needs_kernel = pytest.mark.skipif(rope_library() is None, reason="no AVX2 CPU or C compiler here")


def torch_rotation(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = table.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    return _rotate(x, cos, sin)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


@needs_kernel
@pytest.mark.parametrize("head_dim", [64, 128, 80])  # 80: a scalar tail after the 8-wide vectors
@pytest.mark.parametrize("tokens", [3, 150])  # one thread, and the parallel pass
def test_rotation_equals_torchs_on_fused_qkv_heads(head_dim: int, tokens: int) -> None:
    generator = torch.Generator().manual_seed(head_dim + tokens)
    heads, kv_heads = 6, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator) * 4
    both = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    table = torch.randn(512, head_dim, generator=generator)
    positions = torch.randint(0, 512, (tokens,), generator=generator)
    ours = rotate_native(both, table, positions)
    assert ours is not None
    assert torch.equal(bits(ours), bits(torch_rotation(both, table, positions)))


@needs_kernel
def test_rotary_embedding_gives_the_same_queries_and_keys_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    head_dim, heads, kv_heads, tokens = 64, 4, 2, 70
    rope = RotaryEmbedding(
        head_dim, build_cos_sin_cache({"rope_type": "default", "rope_theta": 10000.0}, head_dim, 1024, 1024)
    )
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    query = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    key = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.arange(100, 100 + tokens)
    ours = rope(positions, query, key)
    separate = rope(positions, query.clone(), key.clone())  # not adjacent: each rotated on its own
    monkeypatch.setattr(rotary, "rotate_native", lambda *args: None)
    theirs = rope(positions, query, key)
    for got in (ours, separate):
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, theirs, strict=True))


def test_tensors_it_does_not_take_are_left_to_torch() -> None:
    table = torch.randn(8, 16)
    positions = torch.arange(3)
    assert rotate_native(torch.randn(3, 2, 16, dtype=torch.float64), table, positions) is None
    assert rotate_native(torch.randn(3, 2, 8), table, positions) is None  # a partial rotation
    assert rotate_native(torch.randn(2, 3, 16).transpose(0, 1), table, positions) is None


@needs_kernel
def test_a_position_past_the_table_raises_as_torch_does() -> None:
    with pytest.raises(IndexError, match="past the RoPE table's 8 rows"):
        rotate_native(torch.randn(2, 2, 16), torch.randn(8, 16), torch.tensor([1, 8]))
