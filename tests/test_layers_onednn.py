"""The oneDNN float32 matmul path (the CPU LM head where the CPU GEMM kernel is unavailable): agreement
with F.linear, and where it stays off."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from batchlm.kernels import cpu_gemm, cpu_native
from batchlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding, use_cpu_lm_head
from batchlm.layers.onednn import onednn_linear, onednn_matmul_works, to_onednn_weight


@pytest.fixture(autouse=True)
def without_cpu_gemm_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The LM head prefers the CPU GEMM kernel; these tests are about the oneDNN path it falls back to."""
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "0")
    cpu_native.native_library.cache_clear()
    cpu_gemm.gemm_library.cache_clear()
    yield
    cpu_native.native_library.cache_clear()
    cpu_gemm.gemm_library.cache_clear()


needs_onednn = pytest.mark.skipif(not onednn_matmul_works(), reason="this torch build has no oneDNN linear")
GEN = torch.Generator().manual_seed(0)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 16, 70])
def test_matches_torch_linear_to_float32_rounding(rows: int) -> None:
    weight = torch.randn(301, 96, generator=GEN)  # odd sizes: no kernel's favourite tile
    x = torch.randn(rows, 96, generator=GEN)
    out = onednn_linear(x, to_onednn_weight(weight))  # type: ignore[arg-type]
    assert out.shape == (rows, 301) and out.dtype == torch.float32 and out.layout == torch.strided
    torch.testing.assert_close(out, F.linear(x, weight), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_non_contiguous_input_rows() -> None:
    weight = torch.randn(40, 32, generator=GEN)
    hidden = torch.randn(10, 32, generator=GEN)[::3]  # sampled rows of a larger batch
    torch.testing.assert_close(onednn_linear(hidden, to_onednn_weight(weight)), F.linear(hidden, weight))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "weight",
    [torch.randn(8, 4).bfloat16(), torch.randn(8, 4).half(), torch.randn(2, 8, 4)],
    ids=["bfloat16", "float16", "3-d"],
)
def test_only_float32_matrices_are_converted(weight: torch.Tensor) -> None:
    assert to_onednn_weight(weight) is None


@needs_onednn
def test_lm_head_logits_with_onednn_match_the_default_path() -> None:
    vocab, hidden_size = 37, 16
    table = torch.randn(vocab, hidden_size, generator=GEN)
    head = ParallelLMHead(vocab, hidden_size)
    head.load_weight("lm_head.weight", "weight", table)
    hidden = torch.randn(5, hidden_size, generator=GEN)
    expected = head.compute_logits(hidden)
    assert head.use_cpu_matmul() and head.onednn_weight is not None
    torch.testing.assert_close(head.compute_logits(hidden), expected, atol=1e-5, rtol=1e-5)
    # No rows to sample is a valid step (nothing to compute), not a oneDNN error.
    assert head.compute_logits(hidden[:0]).shape == (0, vocab)


def test_bfloat16_head_keeps_the_default_path() -> None:
    head = ParallelLMHead(9, 4).bfloat16()
    assert not head.use_cpu_matmul() and head.onednn_weight is None


@needs_onednn
def test_runner_helper_converts_a_tied_head_and_leaves_the_embedding() -> None:
    model = torch.nn.Module()
    model.embed = VocabParallelEmbedding(13, 8)
    model.head = ParallelLMHead(13, 8)
    model.head.tie_to(model.embed)
    model.embed.load_weight("embed", "weight", torch.randn(13, 8, generator=GEN))
    assert use_cpu_lm_head(model)
    assert isinstance(model.embed.weight, torch.nn.Parameter) and model.embed.weight.layout == torch.strided
    # The copy is not a parameter or buffer: state dicts are unchanged.
    assert set(model.state_dict()) == {"embed.weight", "head.weight"}
