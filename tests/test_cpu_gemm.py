"""The CPU GEMM kernel (kernels/cpu_kernels.c via cpu_gemm.py): agreement with torch over shapes, packing,
the build cache, the fallbacks, and the layers that use it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batchlm.kernels import cpu_decode_attention, cpu_native
from batchlm.kernels.cpu_gemm import gemm_library, pack_weight, packed_linear
from batchlm.kernels.cpu_native import PANEL, build_library, native_library
from batchlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding, use_cpu_lm_head
from batchlm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
    pack_linears_for_cpu,
)

needs_kernel = pytest.mark.skipif(gemm_library() is None, reason="no AVX2 CPU or C compiler here")
GEN = torch.Generator().manual_seed(0)


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """Let a test re-decide availability (environment, compiler) and restore the real answer after."""
    caches = (native_library, gemm_library, cpu_decode_attention.decode_library)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()


def test_pack_layout_is_panel_major_and_zero_padded() -> None:
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    packed = pack_weight(weight)
    assert packed.panels.shape == (2, 3, PANEL) and packed.panels.is_contiguous()
    assert (packed.out_features, packed.in_features) == (20, 3)
    for row in range(20):
        assert torch.equal(packed.panels[row // PANEL, :, row % PANEL], weight[row])
    assert not packed.panels[1, :, 4:].any()  # columns 20..31 do not exist


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 16, 17, 300])
@pytest.mark.parametrize(
    "out_features,in_features", [(1, 1), (15, 37), (16, 64), (17, 3), (301, 96), (96, 576)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch_linear(rows: int, out_features: int, in_features: int, with_bias: bool) -> None:
    weight = torch.randn(out_features, in_features, generator=GEN)
    bias = torch.randn(out_features, generator=GEN) if with_bias else None
    x = torch.randn(rows, in_features, generator=GEN)
    out = packed_linear(x, pack_weight(weight), bias)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_more_rows_than_one_row_block_and_odd_strides() -> None:
    weight = torch.randn(40, 24, generator=GEN)
    x = torch.randn(600, 48, generator=GEN)[:, ::2]  # rows of a wider tensor, non-unit column stride
    torch.testing.assert_close(
        packed_linear(x, pack_weight(weight)), F.linear(x, weight), atol=1e-4, rtol=1e-4
    )
    wide = torch.randn(9, 40, generator=GEN)[:, :24]  # unit column stride, row stride 40
    torch.testing.assert_close(
        packed_linear(wide, pack_weight(weight)), F.linear(wide, weight), atol=1e-4, rtol=1e-4
    )


@needs_kernel
def test_leading_dimensions_and_other_dtypes() -> None:
    weight = torch.randn(33, 8, generator=GEN)
    x = torch.randn(2, 3, 8, generator=GEN)
    out = packed_linear(x, pack_weight(weight))
    assert out.shape == (2, 3, 33)
    torch.testing.assert_close(out, F.linear(x, weight), atol=1e-4, rtol=1e-4)
    half = x.bfloat16()
    torch.testing.assert_close(
        packed_linear(half, pack_weight(weight)), F.linear(half.float(), weight), atol=1e-4, rtol=1e-4
    )


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_same_result_on_any_thread_count(threads: int) -> None:
    weight = torch.randn(70, 50, generator=GEN)
    x = torch.randn(16, 50, generator=GEN)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = packed_linear(x, pack_weight(weight))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, F.linear(x, weight), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_build_is_cached_and_keyed_by_source(tmp_path: Path) -> None:
    first = build_library(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_library(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert not list(first.parent.glob("*.partial"))  # no temporary left behind


@needs_kernel
def test_a_damaged_cached_library_is_rebuilt(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    damaged = build_library(tmp_path)
    damaged.write_bytes(b"not a shared library")
    monkeypatch.setenv("BATCHLM_CACHE", str(tmp_path))
    assert native_library() is not None and gemm_library() is not None
    assert damaged.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_disabled_by_environment(fresh_library: None, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(cpu_native.DISABLE_ENV, value)
    assert gemm_library() is None
    layer = ColumnParallelLinear(4, 8)
    assert not layer.pack_for_cpu() and layer.packed is None and layer.weight.shape == (8, 4)


def test_no_compiler_falls_back_with_a_warning(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cpu_native, "cpu_supports_kernel", lambda: True)
    monkeypatch.setenv("BATCHLM_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    with caplog.at_level("WARNING"):
        assert gemm_library() is None and cpu_decode_attention.decode_library() is None
    assert "no C compiler found" in caplog.text


def test_failed_compile_names_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'error: unsupported flag' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(RuntimeError, match="unsupported flag"):
        build_library(tmp_path)
    assert not list((tmp_path / "kernels").glob("*"))


def test_packed_linear_without_kernel_is_an_error(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "0")
    with pytest.raises(RuntimeError, match="not available"):
        packed_linear(torch.zeros(1, 2), pack_weight(torch.zeros(3, 2)))


@needs_kernel
def test_layers_give_the_same_outputs_packed_and_release_the_dense_weight() -> None:
    model = torch.nn.Module()
    model.qkv = MergedColumnParallelLinear(24, [16, 8], bias=True)
    model.down = RowParallelLinear(24, 12, bias=True)
    model.bf16_proj = ColumnParallelLinear(24, 8).bfloat16()  # not float32: left alone
    for module in (model.qkv, model.down):
        module.weight.data.normal_(generator=GEN)
        assert module.bias is not None
        module.bias.data.normal_(generator=GEN)
    x = torch.randn(5, 24, generator=GEN)
    expected = (model.qkv(x), model.down(x))
    assert pack_linears_for_cpu(model) == 2
    assert model.qkv.packed is not None and model.qkv.weight.numel() == 0
    assert model.bf16_proj.packed is None and model.bf16_proj.weight.shape == (8, 24)
    torch.testing.assert_close((model.qkv(x), model.down(x)), expected, atol=1e-4, rtol=1e-4)
    assert "packed=True" in repr(model.qkv)


@needs_kernel
def test_lm_head_uses_a_packed_copy_and_leaves_a_tied_embedding() -> None:
    model = torch.nn.Module()
    model.embed = VocabParallelEmbedding(37, 16)
    model.head = ParallelLMHead(37, 16)
    model.head.tie_to(model.embed)
    model.embed.load_weight("embed", "weight", torch.randn(37, 16, generator=GEN))
    hidden = torch.randn(5, 16, generator=GEN)
    expected = model.head.compute_logits(hidden)
    assert use_cpu_lm_head(model) and model.head.packed is not None
    torch.testing.assert_close(model.head.compute_logits(hidden), expected, atol=1e-4, rtol=1e-4)
    assert model.head.compute_logits(hidden[:0]).shape == (0, 37)
    assert model.embed.weight.shape == (37, 16)  # the embedding still looks rows up
    assert set(model.state_dict()) == {"embed.weight", "head.weight"}
