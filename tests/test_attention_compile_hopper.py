"""The attention kernels (the KV write, decode and its reduce, prefill) compile for Hopper (sm_90)
on any machine, over bf16 and FP8 caches, with sinks and head dims that are not powers of two, and
with programmatic dependent launch reading only what no kernel before them writes before the wait.
This catches what the CPU interpreter cannot: FP8 casts, layouts and shared memory that only the CUDA
backend lowers. Whether the results are right is for tests/gpu/ on a GPU.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from batchlm.kernels import fused_ops, kv_write, paged_decode, paged_prefill
from hopper_compile import compile_for_hopper, memory_lines


def test_fp8_kv_write_compiles() -> None:
    types = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": "*fp8e4nv", "slot_ptr": "*i64"}
    types |= {"inv_k_scale": "fp32", "inv_v_scale": "fp32"}
    constants = {
        "BLOCK_SIZE": 16,
        "KV_HEADS": 8,
        "HEAD_DIM": 128,
        "BLOCK_D": 128,
        "BLOCK_H": 8,
        "QUANTIZE": True,
        "FP8_LIMIT": 448.0,
        "PDL": False,
    }
    compile_for_hopper(kv_write._write_kv_kernel, types, constants, num_warps=4)


@pytest.mark.parametrize("cache", ["*bf16", "*fp8e4nv"])
def test_rope_folded_kv_write_compiles_and_waits_before_reading(cache: str) -> None:
    types = {"q_ptr": "*bf16", "key_ptr": "*bf16", "value_ptr": "*bf16", "positions_ptr": "*i64"}
    types |= {"table_ptr": "*fp32", "cache_ptr": cache, "slot_ptr": "*i64", "inv_k_scale": "fp32"}
    types |= {"inv_v_scale": "fp32"}
    constants = {
        "NUM_HEADS": 32, "HEADS_BLOCK": 32, "KV_HEADS": 8, "KV_BLOCK": 8, "HALF": 64, "HALF_BLOCK": 64,
        "BLOCK_SIZE": 16,
        "QUANTIZE": cache == "*fp8e4nv", "FP8_LIMIT": 448.0, "PDL": True,
    }  # fmt: skip
    compiled = compile_for_hopper(
        kv_write._rotate_write_kv_kernel, types, constants, num_warps=4, launch_pdl=True
    )
    memory = memory_lines(compiled.asm["ptx"])
    # Everything it reads (positions, the query written by the GEMV before) comes after the wait,
    # and every load before the first store (q, k and v share one buffer: a later load would wait).
    assert memory[0].startswith("griddepcontrol.launch_dependents")
    assert memory[1].startswith("griddepcontrol.wait")
    first_store = next(i for i, line in enumerate(memory) if "st.global" in line)
    assert not any("ld.global" in line for line in memory[first_store:])


@pytest.mark.parametrize("in_registers", [False, True])
def test_decode_over_an_fp8_cache_compiles(in_registers: bool) -> None:
    types = {"q_ptr": "*bf16", "cache_ptr": "*fp8e4nv", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32"}
    types |= {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32"}
    config = paged_decode.FP8_DECODE_CONFIG
    constants = {
        "BLOCK_SIZE": 16, "GROUP": 4, "BLOCK_G": 16, "HEAD_DIM": 128, "BLOCK_D": 128,
        "BLOCK_N": config.block_n,
        "NUM_SPLITS": 4, "DOT_PRECISION": "tf32", "FP8_IN_REGISTERS": in_registers,
        "WINDOWED": False, "SOFTCAP": False, "PDL": False,
    }  # fmt: skip
    compiled = compile_for_hopper(
        paged_decode._decode_kernel,
        types,
        constants,
        aligned=True,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    ptx = compiled.asm["ptx"]
    assert "cvt.rn.f16x2.e4m3x2" in ptx  # e4m3 widened to fp16 by the hardware's paired conversion
    if in_registers:
        # The tiles reach the tensor cores as fp16 by ldmatrix, never read from shared memory bytewise.
        assert "ld.shared.b8" not in ptx
        assert "ldmatrix" in ptx


@pytest.mark.parametrize("newest", [0, 1])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("cache", ["*bf16", "*fp8e4nv"])
def test_a_split_decode_reads_its_first_tile_before_waiting(cache: str, num_splits: int, newest: int) -> None:
    # Split (a small batch): lengths, block ids and the first key/value tile come before the wait (no
    # kernel of the step writes the lengths and block ids; the tile is read again after it); the
    # query, written by the kernel before, after it. One split (a full batch): nothing is read
    # before the wait.
    types = {"q_ptr": "*bf16", "cache_ptr": cache, "block_table_ptr": "*i32", "seq_lens_ptr": "*i32"}
    types |= {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32"}
    constants = {
        "BLOCK_SIZE": 16, "GROUP": 4, "BLOCK_G": 16, "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_N": 64,
        "NUM_SPLITS": num_splits,
        "DOT_PRECISION": "tf32", "FP8_IN_REGISTERS": cache == "*fp8e4nv", "WINDOWED": False, "SOFTCAP": False,
        "NEWEST": newest,
    }  # fmt: skip

    def lines(pdl: bool) -> list[str]:
        compiled = compile_for_hopper(
            paged_decode._decode_kernel, types, constants | {"PDL": pdl}, aligned=True, num_warps=4,
            num_stages=2, launch_pdl=pdl,
        )  # fmt: skip
        return memory_lines(compiled.asm["ptx"])

    assert not any("griddep" in line for line in lines(False))
    memory = lines(True)
    assert memory[0].startswith("griddepcontrol.launch_dependents")
    (wait,) = [i for i, line in enumerate(memory) if line.startswith("griddepcontrol.wait")]
    early = memory[1:wait]
    if num_splits == 1:
        assert early == []
    else:
        assert all(line.startswith(("ld.global", "@")) and "st.global" not in line for line in early)
        assert sum("ld.global.v4" in line for line in early) >= 2  # keys and values
    assert any("ld.global" in line for line in memory[wait + 1 :])  # the query, the tile again


def test_decode_reduce_reads_the_length_before_waiting_and_the_splits_after() -> None:
    types = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "seq_lens_ptr": "*i32", "out_ptr": "*bf16"}
    constants = {
        "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_N": 64, "NUM_SPLITS": 64, "CHUNK": 16, "WINDOWED": False, "PDL": True,
    }  # fmt: skip
    compiled = compile_for_hopper(paged_decode._reduce_kernel, types, constants, num_warps=4, launch_pdl=True)
    memory = memory_lines(compiled.asm["ptx"])
    assert memory[0].startswith("griddepcontrol.launch_dependents")
    (wait,) = [i for i, line in enumerate(memory) if line.startswith("griddepcontrol.wait")]
    assert wait == 2 and "ld.global.b32" in memory[1]  # the length, from the host
    assert sum("ld.global" in line for line in memory[wait + 1 :]) >= 2  # the splits' weights and outputs
    assert not any("griddep" in line for line in memory[wait + 1 :])


@pytest.mark.parametrize("cache", ["*bf16", "*fp8e4nv"])
def test_attention_kernels_with_sinks_compile(cache: str) -> None:
    # The sink variants: the one-split decode folds the sinks in after its tiles (read after the
    # wait, as everything of a one-split decode is), the reduce and the prefill as they finish.
    fp8 = cache == "*fp8e4nv"
    attention = {"q_ptr": "*bf16", "cache_ptr": cache, "block_table_ptr": "*i32", "seq_lens_ptr": "*i32"}
    attention |= {"out_ptr": "*bf16", "qk_scale": "fp32", "softcap": "fp32", "sinks_ptr": "*fp32"}
    decode = paged_decode.FP8_DECODE_CONFIG if fp8 else paged_decode.DecodeConfig()
    decode_constants = {
        "BLOCK_SIZE": 16, "GROUP": 8, "BLOCK_G": 16, "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_N": decode.block_n,
        "NUM_SPLITS": 1, "DOT_PRECISION": "tf32", "FP8_IN_REGISTERS": decode.fp8_in_registers,
        "WINDOWED": True, "SOFTCAP": False, "PDL": True, "SINKS": True,
    }  # fmt: skip
    compiled = compile_for_hopper(
        paged_decode._decode_kernel, attention | {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"},
        decode_constants, aligned=True, num_warps=decode.num_warps, num_stages=decode.num_stages,
        launch_pdl=True,
    )  # fmt: skip
    memory = memory_lines(compiled.asm["ptx"])
    assert memory[1].startswith("griddepcontrol.wait")
    reduce_types = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "seq_lens_ptr": "*i32"}
    reduce_types |= {"out_ptr": "*bf16", "sinks_ptr": "*fp32"}
    reduce_constants = {
        "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_N": 64, "NUM_SPLITS": 16, "CHUNK": 16, "WINDOWED": True,
        "PDL": True, "SINKS": True,
    }  # fmt: skip
    compile_for_hopper(
        paged_decode._reduce_kernel, reduce_types, reduce_constants, num_warps=4, launch_pdl=True
    )
    prefill_constants = {
        "BLOCK_SIZE": 16, "GROUP": 8, "BLOCK_M": 64, "TOKENS_PER_TILE": 8, "HEAD_DIM": 64, "BLOCK_D": 64,
        "BLOCK_N": 64, "DOT_PRECISION": "tf32", "WINDOWED": True, "SOFTCAP": False, "SINKS": True,
    }  # fmt: skip
    compile_for_hopper(
        paged_prefill._prefill_kernel, attention | {"query_start_ptr": "*i32"}, prefill_constants,
        aligned=True, num_warps=4, num_stages=3,
    )  # fmt: skip


def test_prefill_over_an_fp8_cache_compiles() -> None:
    types = {"q_ptr": "*bf16", "cache_ptr": "*fp8e4nv", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32"}
    types |= {"query_start_ptr": "*i32", "out_ptr": "*bf16", "qk_scale": "fp32"}
    constants = {
        "BLOCK_SIZE": 16, "GROUP": 4, "BLOCK_M": 128, "TOKENS_PER_TILE": 32, "HEAD_DIM": 128, "BLOCK_D": 128,
        "BLOCK_N": 32,
        "DOT_PRECISION": "tf32",
    }  # fmt: skip
    compile_for_hopper(paged_prefill._prefill_kernel, types, constants, num_warps=8, num_stages=2)


@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("cache", ["*bf16", "*fp8e4nv"])
def test_attention_kernels_compile_for_head_dims_that_are_not_powers_of_two(
    cache: str, head_dim: int
) -> None:
    # Phi-2's 80 and Phi-3's 96 are padded to 128 (tl.arange needs a power of two), with the
    # dimension masks compiled in; each kernel must still fit Hopper's shared memory.
    fp8 = cache == "*fp8e4nv"
    heads = {"HEAD_DIM": head_dim, "BLOCK_D": 128}
    attention = {"q_ptr": "*bf16", "cache_ptr": cache, "block_table_ptr": "*i32", "seq_lens_ptr": "*i32"}
    attention |= {"out_ptr": "*bf16", "qk_scale": "fp32", "window": "i32", "softcap": "fp32"}
    decode = paged_decode.FP8_DECODE_CONFIG if fp8 else paged_decode.DecodeConfig()
    decode_types = attention | {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
    decode_constants = heads | {
        "BLOCK_SIZE": 16, "GROUP": 3, "BLOCK_G": 16, "BLOCK_N": decode.block_n, "NUM_SPLITS": 4,
        "DOT_PRECISION": "tf32", "FP8_IN_REGISTERS": decode.fp8_in_registers, "WINDOWED": True,
        "SOFTCAP": True, "PDL": True,
    }  # fmt: skip
    compile_for_hopper(
        paged_decode._decode_kernel, decode_types, decode_constants, aligned=True,
        num_warps=decode.num_warps, num_stages=decode.num_stages, launch_pdl=True,
    )  # fmt: skip
    reduce_types = {
        "part_out_ptr": "*fp32",
        "part_lse_ptr": "*fp32",
        "seq_lens_ptr": "*i32",
        "out_ptr": "*bf16",
    }
    reduce_constants = heads | {"BLOCK_N": 64, "NUM_SPLITS": 4, "CHUNK": 4, "WINDOWED": False, "PDL": False}
    compile_for_hopper(paged_decode._reduce_kernel, reduce_types, reduce_constants, num_warps=4)
    prefill_types = attention | {"query_start_ptr": "*i32"}
    for block_m, block_n, warps, stages in ((128, 32, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3)):
        prefill_constants = heads | {
            "BLOCK_SIZE": 16, "GROUP": 7, "BLOCK_M": block_m, "TOKENS_PER_TILE": block_m // 7,
            "BLOCK_N": block_n, "DOT_PRECISION": "tf32", "WINDOWED": False, "SOFTCAP": False,
        }  # fmt: skip
        compile_for_hopper(
            paged_prefill._prefill_kernel, prefill_types, prefill_constants, aligned=True, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
    kv = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": cache, "slot_ptr": "*i64"}
    kv |= {"inv_k_scale": "fp32", "inv_v_scale": "fp32"}
    kv_constants = heads | {
        "BLOCK_SIZE": 16,
        "KV_HEADS": 5,
        "BLOCK_H": 8,
        "QUANTIZE": fp8,
        "FP8_LIMIT": 448.0,
    }
    compile_for_hopper(kv_write._write_kv_kernel, kv, kv_constants | {"PDL": False}, num_warps=4)
    rotate = kv | {"q_ptr": "*bf16", "positions_ptr": "*i64", "table_ptr": "*fp32"}
    rotate_constants = {
        "NUM_HEADS": 15, "HEADS_BLOCK": 16, "KV_HEADS": 5, "KV_BLOCK": 8, "HALF": head_dim // 2,
        "HALF_BLOCK": 64, "BLOCK_SIZE": 16, "QUANTIZE": fp8, "FP8_LIMIT": 448.0, "PDL": False,
    }  # fmt: skip
    compile_for_hopper(kv_write._rotate_write_kv_kernel, rotate, rotate_constants, num_warps=4)
    rope = {"qk_ptr": "*bf16", "positions_ptr": "*i64", "cache_ptr": "*fp32"}
    rope_constants = {"HALF": head_dim // 2, "HALF_BLOCK": 64, "HEADS_BLOCK": 32, "PDL": False}
    compile_for_hopper(fused_ops._rope_kernel, rope, rope_constants, num_warps=4)
