"""Our quantization kernels, and the attention kernels over an FP8 cache, compile for Hopper (sm_90)
on any machine: Triton compiles ahead of time for a named target with the ptxas it ships, no GPU
needed. This catches what the CPU interpreter cannot: FP8 casts, layouts and shared memory that
only the CUDA backend lowers. Whether the results are right is for tests/gpu/ on a GPU.
"""

from __future__ import annotations

from typing import Any

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from batchlm.kernels import fp8_quant, kv_write, paged_decode, paged_prefill, w4a16_gemm  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# Shared memory per block on an H100/H200 (227 KiB).
HOPPER_SHARED = 232448


def compile_for_hopper(kernel: Any, types: dict[str, str], constants: dict[str, Any], **options: Any) -> Any:
    """Compile `kernel` with every non-constexpr argument typed by `types` (default i32)."""
    names = kernel.arg_names
    signature = {n: ("constexpr" if n in constants else types.get(n, "i32")) for n in names}
    constexprs = {(names.index(n),): v for n, v in constants.items()}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=HOPPER, options=options)
    except RuntimeError as exc:  # pragma: no cover - depends on the install
        if "ptxas" in str(exc) and "not found" in str(exc):
            pytest.skip(f"no ptxas here: {exc}")
        raise
    assert compiled.metadata.shared <= HOPPER_SHARED
    return compiled


@pytest.mark.parametrize(
    ("block_m", "block_n", "block_k", "split_k", "stages"),
    [(16, 64, 128, 4, 4), (64, 128, 64, 1, 3), (32, 128, 32, 1, 3)],
)
def test_w4a16_gemm_compiles(block_m: int, block_n: int, block_k: int, split_k: int, stages: int) -> None:
    types = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*bf16", "zeros_ptr": "*bf16"}
    types["out_ptr"] = "*fp32" if split_k > 1 else "*bf16"
    constants = {
        "GROUP_SIZE": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
        "K_PER_SPLIT": 4096 // split_k, "PRECISION": "tf32",
    }  # fmt: skip
    compiled = compile_for_hopper(w4a16_gemm._w4a16_kernel, types, constants, num_warps=4, num_stages=stages)
    assert "mma" in compiled.asm["ptx"]  # the dot runs on tensor cores


@pytest.mark.parametrize("static", [False, True])
def test_per_token_fp8_compiles(static: bool) -> None:
    types = {"x_ptr": "*bf16", "codes_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "static_scale_ptr": "*fp32"}
    constants = {"K": 4096, "STATIC": static, "BLOCK": 4096, "FP8_LIMIT": 448.0}
    compiled = compile_for_hopper(fp8_quant._per_token_fp8_kernel, types, constants, num_warps=4)
    assert "cvt.rn.satfinite.e4m3x2" in compiled.asm["ptx"]  # round-to-nearest into e4m3


def test_fp8_kv_write_compiles() -> None:
    types = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": "*fp8e4nv", "slot_ptr": "*i64"}
    types |= {"inv_k_scale": "fp32", "inv_v_scale": "fp32"}
    constants = {
        "BLOCK_SIZE": 16,
        "KV_HEADS": 8,
        "HEAD_DIM": 128,
        "BLOCK_H": 8,
        "QUANTIZE": True,
        "FP8_LIMIT": 448.0,
    }
    compile_for_hopper(kv_write._write_kv_kernel, types, constants, num_warps=4)


def test_decode_over_an_fp8_cache_compiles() -> None:
    types = {"q_ptr": "*bf16", "cache_ptr": "*fp8e4nv", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32"}
    types |= {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32"}
    constants = {
        "BLOCK_SIZE": 16, "GROUP": 4, "BLOCK_G": 16, "HEAD_DIM": 128, "BLOCK_N": 64, "NUM_SPLITS": 4,
        "DOT_PRECISION": "tf32",
    }  # fmt: skip
    compile_for_hopper(paged_decode._decode_kernel, types, constants, num_warps=4, num_stages=2)


def test_prefill_over_an_fp8_cache_compiles() -> None:
    types = {"q_ptr": "*bf16", "cache_ptr": "*fp8e4nv", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32"}
    types |= {"query_start_ptr": "*i32", "out_ptr": "*bf16", "qk_scale": "fp32"}
    constants = {
        "BLOCK_SIZE": 16, "GROUP": 4, "BLOCK_M": 128, "TOKENS_PER_TILE": 32, "HEAD_DIM": 128, "BLOCK_N": 32,
        "DOT_PRECISION": "tf32",
    }  # fmt: skip
    compile_for_hopper(paged_prefill._prefill_kernel, types, constants, num_warps=8, num_stages=2)
