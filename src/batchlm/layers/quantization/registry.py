"""Which LinearMethod a layer gets: one decision from the checkpoint format, the layer's tensor types
and the device, made by the first registered chooser that claims it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchlm.layers.quantization.base import LinearMethod
from batchlm.layers.quantization.cpu_quantized import CPU_QUANTIZED, CPU_QUANTIZED_4BIT, kernels_available
from batchlm.layers.quantization.dense import DENSE, DEQUANTIZE
from batchlm.layers.quantization.forms import has_fp8_tensor_cores
from batchlm.layers.quantization.fp8 import FP8
from batchlm.layers.quantization.int4 import INT4

# Checkpoint formats the loader knows.
DENSE_FORMAT = "dense"  # safetensors (or random weights): float tensors
GGUF_FORMAT = "gguf"  # llama.cpp's files: F32/F16/BF16 tensors or GGML quantized blocks
# GGML types that are plain floats (every other type is block-quantized).
FLOAT_QTYPES = frozenset({"F32", "F16", "BF16"})
# Types of quantized safetensors weights (models/quantized_checkpoint.py), beside the GGML names.
FP8_QTYPE = "FP8"  # e4m3 with row scales (compressed-tensors FP8 / FP8_DYNAMIC)
INT4_QTYPE = "INT4"  # 4-bit groups (GPTQ, AWQ, compressed-tensors pack-quantized)
INT8_QTYPE = "INT8"  # 8-bit groups (GPTQ 8-bit, compressed-tensors W8A16)
# e4m3 with one scale per 2-D block (transformers' fine-grained FP8): dequantized as it loads, so its
# layers take dense rows.
BLOCK_FP8_QTYPE = "FP8_BLOCK"
# gpt-oss's MXFP4 experts, decoded as they load to GGUF's MXFP4 blocks (models/mxfp4_weights.py): the
# GGML name, so the quantized CPU kernels take them as they take a GGUF file's.
MXFP4_QTYPE = "MXFP4"


@dataclass(frozen=True)
class WeightSpec:
    """What a chooser sees about one layer: its checkpoint's format, the GGML type of each tensor it
    loads (one per fused shard; empty for dense checkpoints), its role and where it will run."""

    format: str
    qtypes: tuple[str, ...]
    # "linear", "embedding" or "lm_head" (a tied LM head shares the embedding's method and storage).
    role: str
    device: torch.device
    dtype: torch.dtype
    # --quantization: None (weights as the checkpoint has them), "int8" (dense weights to Q8_0, CPU),
    # "fp8" (dense linears to FP8 W8A8) or "w4a16" (dense linears to 4-bit groups).
    quantization: str | None = None


# A chooser returns the method it implements for the layer, or None to let the next one decide.
MethodChooser = Callable[[WeightSpec], LinearMethod | None]


# What --quantization turns a dense linear into.
QUANTIZE_AT_LOAD = {"fp8": FP8_QTYPE, "w4a16": INT4_QTYPE}


def _quantized_safetensors(spec: WeightSpec) -> LinearMethod | None:
    # FP8 and 4-bit linears: from a quantized checkpoint, or dense ones quantized as they load; and an
    # LM head the checkpoint quantized (GPTQ's lm_head option), which --quantization leaves alone.
    kinds = set(spec.qtypes)
    quantized_head = spec.role == "lm_head" and bool(kinds)
    if spec.format != DENSE_FORMAT or not (spec.role == "linear" or quantized_head):
        return None
    quantization = spec.quantization
    if (cpu_method := _on_cpu_kernels(spec, kinds)) is not None:
        return cpu_method
    if kinds == {BLOCK_FP8_QTYPE}:
        kinds, quantization = set(), _block_fp8_quantization(spec)
    if kinds and quantization:
        raise ValueError(
            f"the checkpoint is already quantized ({spec.qtypes[0]}); drop --quantization {quantization}"
        )
    if not kinds and quantization in QUANTIZE_AT_LOAD:
        kinds = {QUANTIZE_AT_LOAD[quantization]}
    if len(kinds) > 1:
        raise ValueError(
            f"a fused layer mixes weight types {sorted(kinds)}; batchlm cannot serve that checkpoint"
        )
    if kinds == {FP8_QTYPE}:
        if not quantization and spec.device.type == "cuda" and not has_fp8_tensor_cores(spec.device):
            # A checkpoint's FP8 W8A8 linears on a GPU without FP8 tensor cores (an A100): dequantized
            # to the model's dtype as they load. (--quantization fp8 there is refused by the method.)
            return DEQUANTIZE
        return FP8
    if kinds == {INT8_QTYPE}:
        # No GPU kernel of ours reads 8-bit groups: dequantized to the model's dtype as they load.
        return DEQUANTIZE
    return INT4 if kinds == {INT4_QTYPE} else None


def _on_cpu_kernels(spec: WeightSpec, kinds: set[str]) -> LinearMethod | None:
    # On an x86-64 CPU with our quantized kernels, where the FP8 and W4A16 methods would widen every
    # weight at every step: a checkpoint's FP8, 4-bit or 8-bit linears as their blocks (groups) or Q8_0
    # of their values (FP8, per row or block-wise: the latter arrive dequantized, dense float32 would
    # take four times FP8's memory); dense linears (block-wise FP8 ones too) under --quantization fp8 as
    # Q8_0 and under w4a16 as 4-bit blocks. Under int8 a checkpoint's quantized linears keep their
    # form (its dense layers become Q8_0, _cpu_quantized).
    if spec.device.type != "cpu" or not kernels_available():
        return None
    if kinds <= {BLOCK_FP8_QTYPE} and spec.quantization in QUANTIZE_AT_LOAD:
        return CPU_QUANTIZED_4BIT if spec.quantization == "w4a16" else CPU_QUANTIZED
    checkpoint_kinds = {FP8_QTYPE, INT4_QTYPE, INT8_QTYPE, BLOCK_FP8_QTYPE, MXFP4_QTYPE}
    checkpoint_kind = len(kinds) == 1 and kinds <= checkpoint_kinds
    return CPU_QUANTIZED if checkpoint_kind and spec.quantization in (None, "int8") else None


def _block_fp8_quantization(spec: WeightSpec) -> str | None:
    # Block-wise FP8 weights arrive dense (dequantized as they load) and are treated as a dense
    # checkpoint's: what --quantization asks, else per-channel FP8 W8A8 where the GPU has FP8 tensor
    # cores (their scales requantized per row), else dense in the model's dtype (later choosers; an
    # x86-64 CPU's kernels take them as Q8_0 before this, _on_cpu_kernels).
    if spec.quantization is not None:
        return spec.quantization
    return "fp8" if has_fp8_tensor_cores(spec.device) else None


def _dense(spec: WeightSpec) -> LinearMethod | None:
    return DENSE if spec.format == DENSE_FORMAT else None


def _cpu_quantized(spec: WeightSpec) -> LinearMethod | None:
    # Our integer kernels for block-quantized GGUF layers and a safetensors checkpoint's MXFP4 experts,
    # and under any --quantization for the layers no earlier chooser took (every layer under int8; the
    # embedding and LM head under fp8 and w4a16, as Q8_0: a float32 LM head is much of a small
    # model's reads), on x86-64 CPUs where the kernels built and passed their probe.
    if spec.device.type != "cpu":
        return None
    quantized_gguf = spec.format == GGUF_FORMAT and any(q not in FLOAT_QTYPES for q in spec.qtypes)
    mxfp4 = spec.format == DENSE_FORMAT and bool(spec.qtypes) and set(spec.qtypes) == {MXFP4_QTYPE}
    if not (quantized_gguf or mxfp4 or spec.quantization is not None) or not kernels_available():
        return None
    return CPU_QUANTIZED


def int8_available() -> bool:
    """Whether --quantization int8 can apply here: the quantized CPU kernels built and passed their probe."""
    return kernels_available()


def _dequantize_gguf(spec: WeightSpec) -> LinearMethod | None:
    # Every GGUF type without a kernel of ours: dequantized to the model dtype as it loads.
    return DEQUANTIZE if spec.format == GGUF_FORMAT else None


# Tried in order; more specific choosers (kernels for some types on some devices) go first.
METHOD_CHOOSERS: list[MethodChooser] = [_quantized_safetensors, _cpu_quantized, _dense, _dequantize_gguf]


def choose_linear_method(spec: WeightSpec) -> LinearMethod:
    for chooser in METHOD_CHOOSERS:
        method = chooser(spec)
        if method is not None:
            return method
    raise ValueError(
        f"no weight method for {spec.format!r} weights of types {list(spec.qtypes)} on {spec.device}"
    )
