"""What a load may combine (--quantization, a quantized checkpoint's scheme, a GGUF file's types, an
adapter), refused at start-up with a message naming it; and what the start-up log says of weights
converted as they load."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from batchlm.layers.quantization import registry
from batchlm.layers.quantization.cpu_quantized import CpuQuantized4BitLinearMethod, CpuQuantizedLinearMethod
from batchlm.layers.quantization.fp8 import Fp8LinearMethod
from batchlm.layers.quantization.int4 import Int4LinearMethod
from batchlm.layers.quantization.registry import FLOAT_QTYPES, QUANTIZE_AT_LOAD
from batchlm.models.lora import LoraAdapter
from batchlm.models.quantized_checkpoint import CheckpointScheme

logger = logging.getLogger(__name__)


def check_quantization(
    quantization: str | None, device: torch.device, random_weights: bool, gguf: bool = False
) -> None:
    """ValueError for a --quantization this load cannot honour."""
    if quantization in QUANTIZE_AT_LOAD and gguf:
        raise ValueError(f"--quantization {quantization} quantizes safetensors checkpoints, not GGUF files")
    on_cpu_kernels = device.type == "cpu" and registry.int8_available()
    if quantization in QUANTIZE_AT_LOAD and device.type != "cuda" and not on_cpu_kernels:
        # Their methods have kernels on NVIDIA GPUs and (as Q8_0 and 4-bit blocks) x86-64 CPUs only;
        # elsewhere they compute from the dequantized weights (what tests need), widened at every step.
        logger.warning(
            "--quantization %s runs on NVIDIA GPUs and x86-64 CPUs with our quantized kernels: on %s its "
            "layers widen every weight at every step, far slower than dense weights",
            quantization,
            "this CPU" if device.type == "cpu" else device.type,
        )
    if quantization is None or quantization in QUANTIZE_AT_LOAD:
        return
    if quantization != "int8":
        offered = ", ".join(repr(q) for q in ["int8", *QUANTIZE_AT_LOAD])
        raise ValueError(f"unknown quantization {quantization!r}; batchlm offers {offered}")
    if device.type != "cpu":
        raise ValueError("--quantization int8 runs on CPUs (x86-64); leave it unset on a GPU")
    if random_weights:
        raise ValueError(
            "--quantization int8 quantizes checkpoint weights; it cannot be used with random weights"
        )
    if not registry.int8_available():
        # Else every layer would quietly stay in float: the memory int8 was asked to save.
        raise ValueError(
            "--quantization int8 runs on the quantized CPU kernels, which are unavailable here (they need "
            "an x86-64 CPU with AVX2 and a C compiler; BATCHLM_CPU_KERNELS=0 turns them off); leave it unset"
        )


def dequantized_weights_summary(
    methods: Counter[str], dtype: torch.dtype, device: torch.device, experts: bool = False
) -> str:
    """What became of weights dequantized as they load (block-wise FP8), from the methods chosen;
    `experts`: whether the model has mixture-of-experts layers (their stacks are dense, FP8 or Q8_0)."""
    where = "the CPU" if device.type == "cpu" else str(device)
    dense = f"dense {str(dtype).removeprefix('torch.')}"
    four_bit_blocks = bool(methods[CpuQuantized4BitLinearMethod.__name__])
    if methods[Fp8LinearMethod.__name__]:
        linears = "per-channel FP8 (each row requantized with one scale)"
    elif methods[CpuQuantizedLinearMethod.__name__]:
        linears = f"Q8_0 blocks on {where}"
    elif four_bit_blocks:
        linears = f"4-bit blocks on {where} (--quantization w4a16)"
    elif methods[Int4LinearMethod.__name__]:
        linears = "4-bit groups (--quantization w4a16)"
    else:
        linears = f"{dense} on {where}"
    summary = f"weights dequantized at load and run as {linears}"
    if experts:
        if methods["quantized experts"]:
            summary += f"; experts as {'4-bit' if four_bit_blocks else 'Q8_0'} blocks"
        elif methods["FP8 experts"]:
            summary += f"; experts as per-row FP8 stacks on {where} (requantized as the linears are)"
        elif methods["INT4 experts"]:
            summary += f"; experts as 4-bit groups on {where} (--quantization w4a16)"
        else:
            summary += f"; experts as {dense}"
    return summary


def mxfp4_experts_summary(methods: Counter[str], dtype: torch.dtype, device: torch.device) -> str:
    """Where an MXFP4 checkpoint's experts run, from the methods chosen (its other weights are dense)."""
    dense = str(dtype).removeprefix("torch.")
    if methods["quantized experts"]:
        experts = "experts kept as MXFP4 blocks on the quantized CPU kernels"
    elif methods["MXFP4 experts"]:
        experts = (
            f"experts kept as MXFP4 stacks on {device} (widened to {dense} as the grouped GEMM reads them)"
        )
    elif device.type == "cpu":
        experts = f"experts dequantized to dense {dense} on the CPU (the quantized CPU kernels do not take them here)"
    else:
        experts = (
            f"experts dequantized to dense {dense} on {device} (MXFP4 stacks need a CUDA GPU and expert "
            "sizes of whole 32-input groups: its memory must hold them)"
        )
    return f"{experts}; other weights dense {dense}"


def check_gguf_quantization(gguf_file: Path, types: dict[str, str], quantization: str | None) -> None:
    """ValueError for --quantization on a GGUF file whose weights are block-quantized already (int8
    quantizes float weights; it would leave such a file as it is)."""
    quantized = sorted({qtype for qtype in types.values() if qtype not in FLOAT_QTYPES})
    if quantization and quantized:
        raise ValueError(
            f"{gguf_file.name} is already quantized ({', '.join(quantized)}); drop --quantization {quantization}"
        )


def check_checkpoint_scheme(
    scheme: CheckpointScheme | None, quantization: str | None, adapter: LoraAdapter | None
) -> None:
    """ValueError for a quantized checkpoint combined with what cannot apply to it."""
    if scheme is None:
        return
    # int8 (a CPU with the quantized kernels, check_quantization) takes the layers the checkpoint left
    # dense (its embedding and LM head: much of a small model's reads) to Q8_0.
    if quantization and quantization != "int8" and not scheme.dequantized_at_load:
        raise ValueError(
            f"the checkpoint is already quantized ({scheme.kind}); drop --quantization {quantization}"
        )
    if adapter is not None:
        raise ValueError(f"a LoRA adapter cannot be merged into a quantized ({scheme.kind}) checkpoint")
