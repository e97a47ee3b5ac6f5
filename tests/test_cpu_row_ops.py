"""The fused decode stack's row operations (kernels/cpu_row_ops.py): the norms and gated activations
of a quantized model's steps that the stack does not take. Against torch's ops within float32
rounding (the sums run in another order), the residual sum exactly; which tensors they take; and that
the runner gives them to a quantized model and not to a dense one, whose bits stay transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.config import EngineConfig
from batchlm.kernels.cpu_decode_stack import stack_library
from batchlm.kernels.cpu_row_ops import StackRowOps
from batchlm.layers.activation import GeluTanhAndMul, SiluAndMul
from batchlm.layers.norm import RMSNorm
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.loader import load_model
from batchlm.models.random_model import write_random_model
from batchlm.runner.fused_decode import build_fused_decode
from batchlm.runner.model_runner import ModelRunner
from gguf_builder import write_tiny_gguf
from models_harness import Chunk, make_kv_caches, run_step

pytestmark = pytest.mark.skipif(stack_library() is None, reason="no AVX2 CPU or C compiler here")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ops() -> StackRowOps:
    library = stack_library()
    assert library is not None
    return StackRowOps(library)


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return bool((ours - theirs).abs().max() <= 1e-6 * theirs.abs().max())


@pytest.mark.parametrize("rows", [1, 70])  # one thread, and the rows shared out
def test_norm_with_the_residual_matches_torch(ops: StackRowOps, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, 576, generator=generator), torch.randn(rows, 576, generator=generator)
    weight = torch.randn(576, generator=generator)
    done = ops.rms_norm(x, weight, 1e-5, residual)
    assert done is not None
    normed, total = done
    assert total is not None and torch.equal(total, x + residual)
    assert _close(normed, F.rms_norm(x + residual, (576,), weight, 1e-5))
    plain = ops.rms_norm(x, weight, 1e-5)
    assert plain is not None and plain[1] is None and _close(plain[0], F.rms_norm(x, (576,), weight, 1e-5))


def test_norm_of_each_head_in_a_fused_projection(ops: StackRowOps) -> None:
    # The queries of a [T, q | k | v] projection: heads contiguous within a token, tokens strided.
    qkv = torch.randn(9, (4 + 2 + 2) * 64)
    queries = qkv[:, : 4 * 64].view(9, 4, 64)
    weight = torch.randn(64)
    done = ops.rms_norm(queries, weight, 1e-6)
    assert done is not None
    assert _close(done[0], F.rms_norm(queries, (64,), weight, 1e-6))


@pytest.mark.parametrize("rows", [3, 64])
def test_gated_activations_match_torch(ops: StackRowOps, rows: int) -> None:
    gate_up = torch.randn(rows, 2 * 200) * 4  # 200: a tail past the vectors
    gate, up = gate_up[:, :200], gate_up[:, 200:]
    silu, gelu = ops.gate_mul(gate_up, gelu=False), ops.gate_mul(gate_up, gelu=True)
    assert silu is not None and _close(silu, F.silu(gate) * up)
    assert gelu is not None and _close(gelu, F.gelu(gate, approximate="tanh") * up)


def test_tensors_they_do_not_take_are_left_to_torch(ops: StackRowOps) -> None:
    weight = torch.randn(36)
    assert ops.rms_norm(torch.randn(4, 36), weight, 1e-6) is None  # not whole vectors
    assert ops.rms_norm(torch.randn(4, 64, dtype=torch.float16), torch.randn(64), 1e-6) is None
    assert ops.rms_norm(torch.randn(64, 4).t(), torch.randn(64), 1e-6) is None  # columns strided
    heads_apart = torch.randn(3, 4, 128)[:, :, :64]  # heads not contiguous within a token
    assert ops.rms_norm(heads_apart, torch.randn(64), 1e-6) is None
    assert ops.gate_mul(torch.randn(4, 7), gelu=False) is None


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_a_quantized_models_steps_with_them_match_its_torch_ops(tmp_path: Path, model_type: str) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", model_type, "Q4_K", True)
    loaded = load_model(prepare_gguf_model_dir(gguf, tmp_path / "model"), torch.float32, CPU, progress=False)
    chunks = [Chunk([5, 17, 42, 99, 3, 250, 7] * 3, 0, [0, 1]), Chunk(list(range(100, 140)), 0, [2, 3, 4])]
    reference = run_step(loaded.model, make_kv_caches(loaded, 8, 16), chunks)
    caches = make_kv_caches(loaded, 8, 16)
    fused = build_fused_decode(loaded.model, caches, TorchAttentionBackend())
    assert fused is not None
    fused.share_row_ops()
    shared = [m for m in loaded.model.modules() if isinstance(m, (RMSNorm, SiluAndMul, GeluTanhAndMul))]
    assert shared and all(module.row_ops is not None for module in shared)
    ours = run_step(loaded.model, caches, chunks)
    assert not torch.equal(ours, reference)  # the rows went through the stack's arithmetic
    assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_the_runner_gives_them_to_quantized_models_only(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3", "Q8_0", True)
    dense_dir = write_random_model(tmp_path / "dense", model_type="qwen3")
    runners = {
        "gguf": ModelRunner(EngineConfig(model=str(gguf)), prepare_gguf_model_dir(gguf, tmp_path / "q")),
        "dense": ModelRunner(EngineConfig(model=str(dense_dir)), dense_dir),
    }
    for name, runner in runners.items():
        runner.initialize_kv_cache()
        norms = [m for m in runner.model.modules() if isinstance(m, RMSNorm)]
        assert norms and all((m.row_ops is not None) == (name == "gguf") for m in norms), name
