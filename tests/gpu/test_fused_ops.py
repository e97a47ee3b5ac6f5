"""Fused RMSNorm(+residual), SiLU-and-mul and RoPE kernels against their torch references, and a whole
model on the GPU (fused path) against transformers. GPU only (marked `gpu`)."""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, INTERPRET, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from batchlm.kernels import fused_ops  # noqa: E402

DTYPES = [torch.float32] if INTERPRET else [torch.bfloat16, torch.float16, torch.float32]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hidden"), [(1, 64), (7, 576), (300, 2048), (3, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, rows: int, hidden: int, with_residual: bool) -> None:
    x = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)
    residual = torch.randn_like(x) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    out, new_residual = fused_ops.rms_norm(x, weight, 1e-5, residual)
    expected, expected_residual = fused_ops.rms_norm_reference(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    if with_residual:
        assert new_residual is not None and expected_residual is not None
        torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    else:
        assert new_residual is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "inter"), [(1, 128), (5, 1536), (260, 8192)])
def test_silu_and_mul(dtype: torch.dtype, rows: int, inter: int) -> None:
    x = torch.randn(rows, 2 * inter, device=DEVICE, dtype=dtype)
    torch.testing.assert_close(
        fused_ops.silu_and_mul(x),
        fused_ops.silu_and_mul_reference(x),
        atol=TOLERANCE[dtype],
        rtol=TOLERANCE[dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    # Phi-3-mini's head of 96 and Phi-2's 80 are padded to a power of two inside the kernel.
    [(32, 8, 64), (9, 3, 64), (32, 8, 128), (4, 1, 16), (32, 32, 96), (14, 2, 80)],
)
def test_rope_in_place_on_fused_qkv(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    tokens = 37
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    cache = torch.randn(4096, head_dim, device=DEVICE)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    expected = fused_ops.rotary_embedding_reference(positions, qk.clone(), cache)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    fused_ops.rotary_embedding_(positions, qk, cache)
    torch.testing.assert_close(qk, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # values untouched


def test_empty_inputs() -> None:
    x = torch.empty(0, 64, device=DEVICE)
    assert fused_ops.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6)[0].shape == (0, 64)
    assert fused_ops.silu_and_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)


@pytest.mark.skipif(INTERPRET, reason="whole-model check needs a real GPU")
def test_fused_model_greedy_matches_transformers(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    from batchlm import LLM, SamplingParams
    from models_harness import hf_generated

    model_dir = tiny_model_dir("llama")
    prompt = list(range(10, 40))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    expected = hf_generated(hf, prompt, 16)
    # A fixed KV cache: sized from free memory, it would count what earlier tests in this process hold.
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", num_gpu_blocks_override=256)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected
