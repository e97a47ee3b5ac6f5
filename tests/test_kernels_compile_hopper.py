"""Our quantization kernels (GEMMs, one-row GEMVs, grouped expert GEMMs), the decode path's small
kernels and the sampler's race compile for Hopper (sm_90) on any machine (tests/hopper_compile.py).
This catches what the CPU interpreter cannot: FP8 casts, layouts and shared memory that only the
CUDA backend lowers. Whether the results are right is for tests/gpu/ on a GPU. The attention
kernels' compile tests are test_attention_compile_hopper.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

pytest.importorskip("triton")
from batchlm.kernels import (
    fp8_quant,
    fused_ops,
    kv_write,
    moe_gemm,
    one_row_gemv,
    w4a16_gemm,
    w4a16_gemv,
)
from batchlm.kernels.decode_plans import GemvConfig
from batchlm.sampling import race_kernel
from hopper_compile import HOPPER, GPUTarget, compile_for_hopper, memory_lines


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


def compile_grouped_gemm(
    weights: dict[str, str],
    forms: tuple[str, ...],
    constants: dict[str, Any],
    target: GPUTarget = HOPPER,
    tile: moe_gemm.GroupedTile | None = None,
) -> Any:
    """The grouped GEMM compiled for `target` with weight pointers typed by `weights`, the variant
    flags named in `forms` ("MXFP4", "FP8", "FP8_BITS", "INT4") on and the others off, `constants`
    (K, MUL_SLOT_WEIGHTS, the blocks, unit strides), and the warps and stages of `tile` (default 4, 3)."""
    types = {
        "a_ptr": "*bf16", "c_ptr": "*bf16", "slot_weights_ptr": "*fp32", "sorted_slots_ptr": "*i64",
        "block_experts_ptr": "*i64", "padded_rows_ptr": "*i64",
    } | weights  # fmt: skip
    flags = {flag: flag in forms for flag in ("MXFP4", "FP8", "FP8_BITS", "INT4")}
    warps, stages = (tile.num_warps, tile.num_stages) if tile else (4, 3)
    return compile_for_hopper(
        moe_gemm._grouped_gemm_kernel, types, {"PRECISION": "tf32"} | flags | constants, aligned=True,
        target=target, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def grouped_gemm_ptx(
    weights: dict[str, str],
    forms: tuple[str, ...],
    constants: dict[str, Any],
    target: GPUTarget = HOPPER,
) -> str:
    """The PTX of compile_grouped_gemm's kernel."""
    return str(compile_grouped_gemm(weights, forms, constants, target).asm["ptx"])


# Shared memory a block may use on Ampere and Ada workstation GPUs (RTX 3090, 4090; 99 KiB).
WORKSTATION_SHARED = 101376
# (weight pointer types, variant flags, the stack form tile_for reads, the oldest GPU that runs it)
STACK_VARIANTS = [
    ({"b_ptr": "*bf16", "b_scales_ptr": "*bf16"}, (), "dense", 80),
    ({"b_ptr": "*fp8e4nv", "b_scales_ptr": "*fp32"}, ("FP8",), "fp8", 89),
    ({"b_ptr": "*u8", "b_scales_ptr": "*fp32"}, ("FP8", "FP8_BITS"), "fp8", 80),
    ({"b_ptr": "*u8", "b_scales_ptr": "*u8"}, ("MXFP4",), "packed", 80),
    ({"b_ptr": "*u8", "b_scales_ptr": "*fp32", "b_zeros_ptr": "*u8"}, ("INT4",), "packed", 80),
]


@pytest.mark.parametrize("variant", STACK_VARIANTS, ids=lambda v: "+".join(v[1]) or "dense")
def test_every_grouped_gemm_launch_shape_fits_a_workstation_gpu(
    variant: tuple[dict[str, str], tuple[str, ...], moe_gemm.StackForm, int],
) -> None:
    # What tile_for picks for each block size and launch shape and a wide and a narrow projection,
    # compiled for the oldest GPU the variant runs on, within the shared memory of a 24 GB
    # workstation card.
    weights, forms, form, capability = variant
    for rows_per_expert, n in itertools.product(moe_gemm.rows_per_expert_of_each_launch(form), (2880, 64)):
        block_m = moe_gemm.block_m_for(int(rows_per_expert * 128), 128)
        tile = moe_gemm.tile_for(n, block_m, form, rows_per_expert)
        block_k = 128 if "INT4" in forms else tile.block_k  # a 4-bit step is one group, 128 the widest
        constants = {"K": 2880, "MUL_SLOT_WEIGHTS": True, "BLOCK_M": block_m, "BLOCK_N": tile.block_n}
        compiled = compile_grouped_gemm(
            weights, forms, constants | {"BLOCK_K": block_k}, GPUTarget("cuda", capability, 32), tile
        )
        assert compiled.metadata.shared <= WORKSTATION_SHARED, (tile, compiled.metadata.shared)


@pytest.mark.parametrize("form", ["dense", "fp8", "packed"])
def test_the_moe_warm_up_runs_every_launch_a_step_can_pick(form: moe_gemm.StackForm) -> None:
    # A launch shape first met while serving would compile inside a step (or a graph's capture).
    def launch(slots: int, experts: int = 128) -> tuple[int, moe_gemm.GroupedTile]:
        block_m = moe_gemm.block_m_for(slots, experts)
        return block_m, moe_gemm.tile_for(2880, block_m, form, slots / experts)

    warmed = {launch(int(rows * 128)) for rows in moe_gemm.rows_per_expert_of_each_launch(form)}
    assert {launch(slots) for slots in range(1, 128 * 256, 7)} == warmed


@pytest.mark.parametrize(("block_m", "block_n", "block_k"), [(16, 128, 64), (16, 64, 32), (64, 128, 128)])
def test_mxfp4_grouped_gemm_compiles(block_m: int, block_n: int, block_k: int) -> None:
    """The MXFP4 variant widens its tiles in registers: the code bytes arrive by asynchronous copies
    as the dense weights would, and each group's scale byte is read once, not once a code byte."""
    ptx = grouped_gemm_ptx(
        {"b_ptr": "*u8", "b_scales_ptr": "*u8"},
        ("MXFP4",),
        {"K": 2880, "MUL_SLOT_WEIGHTS": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
    )
    assert "mma" in ptx and "cp.async" in ptx
    # Byte loads only for the scales, a thread's share of a step's [BLOCK_N, BLOCK_K / 32] in each
    # pipelined copy of the loop (reading a scale a code byte would take 16 times as many).
    scale_bytes_a_thread = max(1, block_n * (block_k // 32) // (4 * 32))
    assert ptx.count("ld.global.b8") + ptx.count("ld.global.u8") <= 4 * scale_bytes_a_thread


# Unit strides along K, as Triton specializes a launch's stride arguments equal to 1.
UNIT_K_STRIDES = {"stride_ak": 1, "stride_bk": 1}


@pytest.mark.parametrize(("block_m", "block_n", "block_k"), [(16, 64, 128), (64, 128, 64)])
def test_fp8_grouped_gemm_compiles(block_m: int, block_n: int, block_k: int) -> None:
    """The FP8 variant's weight bytes arrive by asynchronous copies as the dense weights would, are
    widened by the e4m3 pair conversion (not a per-value one), and each row's scale is read once,
    before the loop."""
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    ptx = grouped_gemm_ptx(
        {"b_ptr": "*fp8e4nv", "b_scales_ptr": "*fp32"},
        ("FP8",),
        {"K": 2048, "MUL_SLOT_WEIGHTS": True} | blocks | UNIT_K_STRIDES,
    )
    assert "mma" in ptx and "cp.async.cg" in ptx and "cvt.rn.f16x2.e4m3x2" in ptx
    assert ptx.count("cvt.f32.f16") <= block_n * block_k // 128  # one a weight a thread, no more


def test_fp8_grouped_gemm_compiles_for_gpus_without_e4m3_conversions() -> None:
    """For an A100 (sm_80) the FP8 weights arrive as bytes by asynchronous copies and are widened by
    bit placement: no e4m3 instruction, which that GPU lacks."""
    ptx = grouped_gemm_ptx(
        {"b_ptr": "*u8", "b_scales_ptr": "*fp32"},
        ("FP8", "FP8_BITS"),
        {"K": 2048, "MUL_SLOT_WEIGHTS": True, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128} | UNIT_K_STRIDES,
        target=GPUTarget("cuda", 80, 32),
    )
    assert ".target sm_80" in ptx and "mma" in ptx and "cp.async.cg" in ptx and "e4m3" not in ptx


@pytest.mark.parametrize(("block_m", "block_n", "group"), [(16, 64, 128), (32, 64, 32), (64, 128, 64)])
def test_int4_grouped_gemm_compiles(block_m: int, block_n: int, group: int) -> None:
    """The 4-bit variant's code bytes arrive by asynchronous copies as the dense weights would, and a
    step's scales and zero points are one value a column (not one a code)."""
    ptx = grouped_gemm_ptx(
        {"b_ptr": "*u8", "b_scales_ptr": "*fp32", "b_zeros_ptr": "*u8"},
        ("INT4",),
        {"K": 2048, "MUL_SLOT_WEIGHTS": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": group}
        | {"stride_ak": 1},
    )
    assert "mma" in ptx and "cp.async.cg" in ptx
    # A thread's share of a step's [BLOCK_N] zero points, in each pipelined copy of the loop.
    zero_bytes_a_thread = max(1, block_n // (4 * 32))
    assert ptx.count("ld.global.b8") + ptx.count("ld.global.u8") <= 4 * zero_bytes_a_thread


@pytest.mark.parametrize("static", [False, True])
def test_per_token_fp8_compiles(static: bool) -> None:
    types = {"x_ptr": "*bf16", "codes_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "static_scale_ptr": "*fp32"}
    constants = {"K": 4096, "STATIC": static, "BLOCK": 4096, "FP8_LIMIT": 448.0}
    compiled = compile_for_hopper(fp8_quant._per_token_fp8_kernel, types, constants, num_warps=4)
    assert "cvt.rn.satfinite.e4m3x2" in compiled.asm["ptx"]  # round-to-nearest into e4m3


def one_row_constants(config: GemvConfig) -> dict[str, Any]:
    return {"HAS_BIAS": True, "BLOCK_N": config.block_n, "SPLIT_K": config.split_k}


def gemv_ptx(
    kernel: Any, types: dict[str, str], constants: dict[str, Any], config: GemvConfig, pdl: bool
) -> str:
    """The PTX of a one-row GEMV launched on whole weight rows (launched with PDL when `pdl`)."""
    compiled = compile_for_hopper(
        kernel, types, constants, aligned=True, num_warps=config.num_warps, launch_pdl=pdl
    )
    return str(compiled.asm["ptx"])


def one_row_gemv_ptx(config: GemvConfig, weight: str, pdl: bool, gated: bool = False) -> str:
    types = {"x_ptr": "*bf16", "w_ptr": weight, "scale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    types |= {"partial_ptr": "*fp32", "arrivals_ptr": "*i32"}
    k_per_split = -(-4096 // (config.split_k * config.block_k)) * config.block_k
    constants = one_row_constants(config) | {
        "K": 4096, "K_PER_SPLIT": k_per_split, "BLOCK_K": config.block_k, "X_VECTOR": config.x_vector,
        "LATE_SUM": config.late_sum, "HAS_SCALE": weight == "*fp8e4nv", "GATED": gated, "PDL": pdl,
    }  # fmt: skip
    return gemv_ptx(one_row_gemv._one_row_kernel, types, constants, config, pdl)


@pytest.mark.parametrize(
    ("config", "weight"),
    [(c, "*fp8e4nv") for c in one_row_gemv.one_row_configs(1)]
    + [(c, "*bf16") for c in one_row_gemv.one_row_configs(2)],
    ids=repr,
)
def test_one_row_candidates_compile_to_16_byte_weight_loads(config: GemvConfig, weight: str) -> None:
    assert "ld.global.v4.b32" in one_row_gemv_ptx(config, weight, pdl=False)


@pytest.mark.parametrize("late_sum", [False, True], ids=["sum-per-step", "late-sum"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "silu-gated"])
@pytest.mark.parametrize("weight", ["*fp8e4nv", "*bf16"])
def test_one_row_gemv_reads_its_first_weights_before_waiting_for_the_previous_kernel(
    weight: str, gated: bool, late_sum: bool
) -> None:
    # A gated input ([gate | up], written by the GEMV before) is read only after the wait too.
    configs = one_row_gemv.one_row_configs(1 if weight == "*fp8e4nv" else 2)
    config = next(c for c in configs if c.late_sum == late_sum)
    lines = memory_lines(one_row_gemv_ptx(config, weight, pdl=True, gated=gated))
    assert lines[0].startswith("griddepcontrol.launch_dependents")
    (wait,) = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")]
    # The first tile's weight reads (16-byte vectors), and nothing else, precede the wait.
    assert wait > 1 and all("ld.global.v4.b32" in line for line in lines[1:wait])
    assert any("st.global" in line for line in lines[wait:])
    assert "griddep" not in one_row_gemv_ptx(config, weight, pdl=False)


def prologue_kernels() -> list[tuple[Any, dict[str, str], dict[str, Any], int]]:
    """(kernel, argument types, constants, warps) of the decode-path kernels that start with pdl_prologue."""
    norm = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16"}
    norm |= {"residual_out_ptr": "*bf16", "eps": "fp32"}
    rope = {"qk_ptr": "*bf16", "positions_ptr": "*i64", "cache_ptr": "*fp32"}
    kv = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": "*bf16", "slot_ptr": "*i64"}
    kv |= {"inv_k_scale": "fp32", "inv_v_scale": "fp32"}
    return [
        (fused_ops._rms_norm_kernel, norm, {"HAS_RESIDUAL": True, "BLOCK": 2048}, 8),
        (fused_ops._silu_and_mul_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"}, {"BLOCK": 1024}, 4),
        (fused_ops._rope_kernel, rope, {"HALF": 32, "HALF_BLOCK": 32, "HEADS_BLOCK": 32}, 4),
        (
            kv_write._write_kv_kernel,
            kv,
            {
                "BLOCK_SIZE": 16,
                "KV_HEADS": 8,
                "HEAD_DIM": 64,
                "BLOCK_D": 64,
                "BLOCK_H": 8,
                "QUANTIZE": False,
                "FP8_LIMIT": 448.0,
            },
            1,
        ),
    ]


@pytest.mark.parametrize("case", prologue_kernels(), ids=lambda case: case[0].fn.__name__)
def test_decode_path_kernels_signal_then_wait_before_any_memory_access_only_with_pdl(case: Any) -> None:
    kernel, types, constants, warps = case
    plain = memory_lines(
        compile_for_hopper(kernel, types, constants | {"PDL": False}, num_warps=warps).asm["ptx"]
    )
    assert not any("griddep" in line for line in plain)
    lines = memory_lines(
        compile_for_hopper(kernel, types, constants | {"PDL": True}, num_warps=warps, launch_pdl=True).asm[
            "ptx"
        ]
    )
    assert lines[0].startswith("griddepcontrol.launch_dependents")
    assert lines[1].startswith("griddepcontrol.wait")
    assert not any("griddep" in line for line in lines[2:])


def w4a16_gemv_ptx(config: GemvConfig, pdl: bool) -> str:
    types = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*bf16", "zeros_ptr": "*bf16"}
    types |= {"bias_ptr": "*bf16", "out_ptr": "*bf16", "partial_ptr": "*fp32", "arrivals_ptr": "*i32"}
    groups = 4096 // 128
    constants = one_row_constants(config) | {
        "GROUPS": groups, "GROUPS_PER_SPLIT": -(-groups // config.split_k), "WORDS_PER_GROUP": 16,
        "BLOCK_KW": w4a16_gemv.words_per_step(config.block_k, 128), "LATE_SUM": config.late_sum, "PDL": pdl,
    }  # fmt: skip
    return gemv_ptx(w4a16_gemv._w4a16_gemv_kernel, types, constants, config, pdl)


@pytest.mark.parametrize("config", w4a16_gemv.ONE_ROW_CONFIGS, ids=repr)
def test_w4a16_one_row_candidates_compile_to_16_byte_word_loads(config: GemvConfig) -> None:
    assert "ld.global.v4.b32" in w4a16_gemv_ptx(config, pdl=False)


LATE_SUM = GemvConfig(256, 128, 4, 1, split_k=16, late_sum=True)


@pytest.mark.parametrize("late_sum", [False, True], ids=["sum-per-group", "late-sum"])
def test_w4a16_gemv_reads_its_first_words_before_waiting_for_the_previous_kernel(late_sum: bool) -> None:
    config = LATE_SUM if late_sum else w4a16_gemv.ONE_ROW_CONFIGS[0]
    assert config in w4a16_gemv.ONE_ROW_CONFIGS
    lines = memory_lines(w4a16_gemv_ptx(config, pdl=True))
    assert lines[0].startswith("griddepcontrol.launch_dependents")
    (wait,) = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")]
    before = lines[1:wait]
    # The first group's words (16-byte loads), and with late sums its scales and zero points too
    # (two bf16 a thread, one 32-bit load each); no activation (16-bit loads) and no store.
    words = [line for line in before if "ld.global.v4.b32" in line]
    scales = [line for line in before if "ld.global.b32" in line]
    assert words and len(scales) == (2 if late_sum else 0) and len(words) + len(scales) == len(before)


def test_w4a16_gemv_late_sum_loop_waits_on_no_load_at_a_barrier() -> None:
    # Scales read in the loop cross to the sums' layout through shared memory: the value a barrier
    # waits for was loaded a group earlier (a register carried round the loop), never just before.
    ptx = w4a16_gemv_ptx(LATE_SUM, pdl=False).splitlines()
    header = next(i for i, line in enumerate(ptx) if "Loop Header" in line)
    back = next(i for i, line in enumerate(ptx) if i > header and "bra" in line and "BB0_" in line)
    body = [line.strip() for line in ptx[header:back]]
    loaded = {line.split("{")[1].split("}")[0].strip() for line in body if "ld.global.b32" in line}
    stored = [line for line in body if line.startswith("st.shared")]
    assert loaded and stored
    assert not any(register in line for line in stored for register in loaded)
    # One sum across threads, after the loop: none inside it.
    assert not any("shfl" in line for line in body)


@pytest.mark.parametrize("logits", ["fp32", "bf16", "fp16"])
def test_race_draws_philox_once_per_four_columns(logits: str) -> None:
    # Each thread holds BLOCK / threads columns; one Philox draw (10 rounds, two mul.hi each) must
    # serve four of them, not one (tl.rand's way) or four threads' worth (a replicated layout).
    types = {"logits_ptr": f"*{logits}", "temperature_ptr": "*fp32", "score_ptr": "*fp32", "col_ptr": "*i32"}
    num_warps = 8
    compiled = compile_for_hopper(
        race_kernel._race_kernel, types | {"seed": "i64"}, {"BLOCK": 2048}, num_warps=num_warps
    )
    columns_per_thread = 2048 // (32 * num_warps)
    assert compiled.asm["ptx"].count("mul.hi") <= 20 * columns_per_thread // 4
