"""Quantized safetensors checkpoints: which scheme config.json declares, which weights it quantized,
and the stream of tensors regrouped so that each quantized weight reaches its layer as one object.

A quantized linear is stored as several tensors (GPTQ: qweight, qzeros, scales; FP8: weight,
weight_scale and maybe input_scale; ...). `assemble` buffers them per module until all parts are
there, then hands the loader `<module>.weight` as an Fp8Weight or Int4Weight; every other tensor
passes through. Per-layer KV-cache scales (`self_attn.k_scale` / `v_scale`) are taken out of the
stream and kept for the FP8 KV cache.

Block-wise FP8 (transformers' "fine-grained" FP8: weight and weight_scale_inv, one scale per block of
e.g. 128x128) is the exception: no kernel of ours takes its scales, so each weight is dequantized to
the model's dtype as it is assembled and reaches its layer as a dense tensor, which the layer's method
(registry.py) then stores as it stores any dense weight.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchlm.kernels.fp8_types import FP8_DTYPE
from batchlm.layers.quantization.base import LoadedWeight
from batchlm.layers.quantization.registry import (
    BLOCK_FP8_QTYPE,
    FP8_QTYPE,
    INT4_QTYPE,
    INT8_QTYPE,
    MXFP4_QTYPE,
)
from batchlm.models.checkpoint import open_safetensors
from batchlm.models.fp8_formats import dequantize_fp8_blocks, fp8_weight
from batchlm.models.int4_formats import unpack_awq, unpack_compressed_int4, unpack_gptq, unpack_int8_weight

FP8 = "fp8"  # compressed-tensors FP8 W8A8 (FP8_DYNAMIC or static per-tensor)
BLOCK_FP8 = "block-fp8"  # transformers' fine-grained FP8: 2-D blocks of weights share a scale
GPTQ = "gptq"
AWQ = "awq"
CT_INT4 = "compressed-tensors pack-quantized"  # W4A16 (and W8A16)
CT_INT8 = "compressed-tensors int-quantized"  # int8 weights unpacked: W8A16, W8A8
# gpt-oss's released checkpoints: experts as MXFP4 `_blocks` / `_scales` pairs, the rest bf16. The
# pairs are decoded by the family's own loading (models/gpt_oss.py), not by `Assembler`.
MXFP4 = "mxfp4"
# The tensors that make up one quantized weight, by scheme.
PARTS = {
    FP8: ("weight", "weight_scale"),
    BLOCK_FP8: ("weight", "weight_scale_inv"),
    GPTQ: ("qweight", "qzeros", "scales"),
    AWQ: ("qweight", "qzeros", "scales"),
    CT_INT4: ("weight_packed", "weight_scale", "weight_shape"),
    CT_INT8: ("weight", "weight_scale"),
}
# Tensors whose presence marks a module as quantized, by scheme.
MARKER = {
    FP8: "weight_scale",
    BLOCK_FP8: "weight_scale_inv",
    GPTQ: "qweight",
    AWQ: "qweight",
    CT_INT4: "weight_packed",
    CT_INT8: "weight_scale",
}
SUPPORTED = (
    "compressed-tensors FP8 W8A8 (FP8_DYNAMIC, static per-tensor FP8), block-wise FP8 (quant_method "
    "fp8 with 2-D weight_block_size, dynamic activations), compressed-tensors W4A16 and W8A16 pack-quantized "
    "(symmetric, any actorder), compressed-tensors int-quantized int8 (W8A16, W8A8 with dynamic "
    "activations), GPTQ 4-bit and 8-bit (desc_act true or false), AWQ 4-bit (GEMM) and MXFP4 experts "
    "(gpt-oss)"
)
# The experts' stacks an MXFP4 checkpoint stores as pairs, and the projections each holds.
MXFP4_STACKS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
# transformers' FineGrainedFP8Config.weight_block_size when config.json leaves it out.
DEFAULT_FP8_BLOCK = (128, 128)
# Each input's group, stored by act-order 4-bit schemes, by scheme.
GROUP_INDEX = {GPTQ: "g_idx", CT_INT4: "weight_g_idx"}
# Parts that carry nothing once the scheme is known: g_idx where groups are runs of inputs (k // group:
# GPTQ with desc_act false), a dynamic scheme's stray input_scale, a symmetric scheme's zero points.
DROPPED = frozenset({"g_idx", "weight_g_idx", "input_scale", "weight_zero_point"})
# compressed-tensors' actorder values whose groups are not runs of inputs (g_idx stored), and those
# whose are (the order only guided the quantizer).
GROUP_ACTORDER = ("group", "dynamic")
WEIGHT_ACTORDER = ("weight", "static")
KV_SCALE = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.(?:([kv])_scale|([kv])_proj\.output_scale)$")


@dataclass(frozen=True)
class CheckpointScheme:
    """The quantization a checkpoint declares (config.json's quantization_config)."""

    kind: str  # FP8, BLOCK_FP8, GPTQ, AWQ, CT_INT4 or MXFP4
    group_size: int = 0  # 4-bit: inputs per group (0: one group per row)
    static_activations: bool = False  # FP8: a stored input_scale per layer
    zeros_minus_one: bool = True  # GPTQ: the original format stores zero - 1
    block: tuple[int, int] = (0, 0)  # BLOCK_FP8: (output rows, inputs) that share one scale
    act_order: bool = False  # 4-bit: each input's group stored (GROUP_INDEX), groups not runs of inputs
    bits: int = 4  # GPTQ and compressed-tensors pack-quantized: 4 or 8 bits a code

    @property
    def weight_type(self) -> str:
        if self.bits == 8:
            return INT8_QTYPE
        return {FP8: FP8_QTYPE, BLOCK_FP8: BLOCK_FP8_QTYPE, MXFP4: MXFP4_QTYPE}.get(self.kind, INT4_QTYPE)

    @property
    def dequantized_at_load(self) -> bool:
        """Whether its weights reach the layers dense (so --quantization may still apply to them)."""
        return self.kind == BLOCK_FP8

    @property
    def assembled(self) -> bool:
        """Whether `Assembler` regroups its parts (MXFP4's pairs are the model family's to decode)."""
        return self.kind != MXFP4


def read_checkpoint_scheme(model_dir: Path) -> CheckpointScheme | None:
    """The checkpoint's scheme, None for an unquantized one; ValueError naming an unsupported one."""
    config = _quantization_config(model_dir)
    if not config:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(config)
    if method == "gptq":
        return _gptq_scheme(config)
    if method == "awq":
        return _awq_scheme(config)
    if method == "fp8":
        return _block_fp8_scheme(config)
    if method == MXFP4:
        return CheckpointScheme(MXFP4)
    raise ValueError(f"quantization method {method!r} is not supported; batchlm serves {SUPPORTED}")


def declares_mxfp4(model_dir: Path) -> bool:
    """Whether the config names quant_method mxfp4 (nothing else read: random weights of its shape)."""
    config = _quantization_config(model_dir)
    return isinstance(config, dict) and str(config.get("quant_method", "")).lower() == MXFP4


def _quantization_config(model_dir: Path) -> Any:
    """config.json's quantization_config as written, None where there is none (or no config.json)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("quantization_config")


def _unsupported(method: str, detail: str) -> ValueError:
    return ValueError(f"{method} checkpoint with {detail} is not supported; batchlm serves {SUPPORTED}")


def _gptq_scheme(config: dict[str, Any]) -> CheckpointScheme:
    bits = int(config.get("bits", 4))
    if bits not in (4, 8):
        raise _unsupported("GPTQ", f"{config.get('bits')}-bit weights")
    group_size = int(config.get("group_size", 128))
    v2 = str(config.get("checkpoint_format", "gptq")) == "gptq_v2"
    act_order = bool(config.get("desc_act"))
    return CheckpointScheme(
        GPTQ, group_size=group_size, zeros_minus_one=not v2, act_order=act_order, bits=bits
    )


def _awq_scheme(config: dict[str, Any]) -> CheckpointScheme:
    bits = int(config.get("bits", config.get("w_bit", 4)))
    version = str(config.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise _unsupported("AWQ", f"{bits}-bit weights in the {version!r} layout")
    if not config.get("zero_point", True):
        raise _unsupported("AWQ", "zero_point false")
    return CheckpointScheme(AWQ, group_size=int(config.get("group_size", config.get("q_group_size", 128))))


def _block_fp8_scheme(config: dict[str, Any]) -> CheckpointScheme:
    """transformers' FineGrainedFP8Config: e4m3 weights with float32 scales per 2-D block, activations
    quantized at run time."""
    name = "block-wise FP8 (quant_method fp8)"
    activations = str(config.get("activation_scheme", "dynamic")).lower()
    if activations != "dynamic":
        raise _unsupported(name, f"activation_scheme {activations!r} (stored activation scales)")
    block = config.get("weight_block_size", DEFAULT_FP8_BLOCK)
    if not _is_2d_block(block):
        raise _unsupported(name, f"weight_block_size {block!r} (only 2-D blocks [rows, inputs])")
    # Newer variants: power-of-two scales in one byte (ue8m0), FP4-packed experts, e5m2 weights.
    for key, wanted in (("scale_fmt", "float"), ("expert_dtype", "fp8"), ("fmt", "e4m3")):
        if config.get(key, wanted) != wanted:
            raise _unsupported(name, f"{key} {config[key]!r}")
    return CheckpointScheme(BLOCK_FP8, block=(int(block[0]), int(block[1])))


def _is_2d_block(block: Any) -> bool:
    return (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in block)
    )


def _compressed_tensors_scheme(config: dict[str, Any]) -> CheckpointScheme:
    groups = list((config.get("config_groups") or {}).values())
    schemes = {_describe(group) for group in groups}
    if len(schemes) != 1:
        raise _unsupported("compressed-tensors", f"{len(schemes)} different schemes {sorted(schemes)}")
    group = groups[0]
    weights = group.get("weights") or {}
    inputs = group.get("input_activations")
    if weights.get("type") == "float" and weights.get("num_bits") == 8:
        return _ct_fp8(weights, inputs, _describe(group))
    fmt = group.get("format") or config.get("format")
    if weights.get("type") == "int" and weights.get("num_bits") == 8 and fmt == "int-quantized":
        return _ct_int8(weights, inputs, _describe(group))
    if weights.get("type") == "int" and weights.get("num_bits") in (4, 8) and not inputs:
        if fmt != "pack-quantized" or not weights.get("symmetric", True):
            raise _unsupported("compressed-tensors", _describe(group) + f", format {fmt}")
        if weights.get("strategy") not in ("group", "channel"):
            raise _unsupported("compressed-tensors", _describe(group))
        actorder = weights.get("actorder")
        if actorder is not None and str(actorder).lower() not in GROUP_ACTORDER + WEIGHT_ACTORDER:
            raise _unsupported("compressed-tensors", f"actorder {actorder!r}")
        group_size = int(weights.get("group_size") or 0) if weights.get("strategy") == "group" else 0
        act_order = str(actorder).lower() in GROUP_ACTORDER
        bits = int(weights["num_bits"])
        return CheckpointScheme(CT_INT4, group_size=group_size, act_order=act_order, bits=bits)
    raise _unsupported("compressed-tensors", _describe(group))


def _ct_int8(weights: dict[str, Any], inputs: dict[str, Any] | None, described: str) -> CheckpointScheme:
    """Symmetric int8 weights stored as int8 (per channel, group or tensor); activations 16-bit (W8A16)
    or int8 per token at run time (W8A8, which our kernels serve with their own activation rounding:
    per block of 32 on a CPU, none on a GPU, where the weights are dequantized)."""
    strategy = weights.get("strategy")
    if not weights.get("symmetric", True) or strategy not in ("channel", "group", "tensor"):
        raise _unsupported("compressed-tensors", described)
    if inputs and not (inputs.get("type") == "int" and inputs.get("num_bits") == 8 and inputs.get("dynamic")):
        raise _unsupported("compressed-tensors", described)
    group_size = int(weights.get("group_size") or 0) if strategy == "group" else 0
    return CheckpointScheme(CT_INT8, group_size=group_size, bits=8)


def _ct_fp8(weights: dict[str, Any], inputs: dict[str, Any] | None, described: str) -> CheckpointScheme:
    if weights.get("strategy") not in ("channel", "tensor"):
        raise _unsupported("compressed-tensors", described)
    if not inputs or inputs.get("type") != "float" or inputs.get("num_bits") != 8:
        raise _unsupported("compressed-tensors", described)
    dynamic_token = bool(inputs.get("dynamic")) and inputs.get("strategy") == "token"
    static_tensor = not inputs.get("dynamic") and inputs.get("strategy") == "tensor"
    if not (dynamic_token or static_tensor):
        raise _unsupported("compressed-tensors", described)
    return CheckpointScheme(FP8, static_activations=static_tensor)


def _describe(group: dict[str, Any]) -> str:
    def part(args: dict[str, Any] | None) -> str:
        if not args:
            return "none"
        dynamic = "dynamic" if args.get("dynamic") else "static"
        size = f"/{args['group_size']}" if args.get("group_size") else ""
        return f"{args.get('type')}{args.get('num_bits')} {args.get('strategy')}{size} {dynamic}"

    return f"weights {part(group.get('weights'))}, activations {part(group.get('input_activations'))}"


def quantized_weight_types(names: Iterable[str], scheme: CheckpointScheme) -> dict[str, str]:
    """HF weight name -> FP8_QTYPE / INT4_QTYPE for each module the checkpoint quantized; for MXFP4,
    each expert projection's per-expert name (`<experts>.gate_proj.weight`, as the experts' method
    is chosen) -> MXFP4_QTYPE."""
    if scheme.kind == MXFP4:
        return _mxfp4_projection_types(names)
    marker = MARKER[scheme.kind]
    return {
        f"{name.removesuffix('.' + marker)}.weight": scheme.weight_type
        for name in names
        if name.endswith("." + marker)
    }


def _mxfp4_projection_types(names: Iterable[str]) -> dict[str, str]:
    types: dict[str, str] = {}
    for name in names:
        experts, _, param = name.rpartition(".")
        stack = param.removesuffix("_blocks")
        for projection in MXFP4_STACKS.get(stack, ()) if stack != param else ():
            types[f"{experts}.{projection}.weight"] = MXFP4_QTYPE
    return types


def checkpoint_names(files: list[Path]) -> list[str]:
    """Every tensor name in the safetensors files (headers only)."""
    names: list[str] = []
    for path in files:
        with open_safetensors(path) as handle:
            names.extend(handle.keys())
    return names


@dataclass
class Assembler:
    """Regroups a checkpoint's tensor stream (see the module docstring)."""

    scheme: CheckpointScheme
    quantized: set[str]  # module names whose weight the checkpoint quantized
    # Where the parts are unpacked (the model's device: a GPU unpacks an 8B model's words in moments).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The model's dtype: what block-wise FP8 weights are dequantized to.
    dtype: torch.dtype = torch.float32
    kv_scales: dict[int, dict[str, float]] = field(default_factory=dict)
    _pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def run(self, weights: Iterable[tuple[str, LoadedWeight]]) -> Iterator[tuple[str, LoadedWeight]]:
        wanted = set(PARTS[self.scheme.kind]) | ({"input_scale"} if self.scheme.static_activations else set())
        if self.scheme.act_order:
            wanted.add(GROUP_INDEX[self.scheme.kind])
        for name, tensor in weights:
            if self._take_kv_scale(name, tensor):
                continue
            module, _, part = name.rpartition(".")
            if module not in self.quantized or not isinstance(tensor, torch.Tensor):
                self._check_not_fp8(name, tensor)
                yield name, tensor
            elif part in wanted:
                parts = self._pending.setdefault(module, {})
                parts[part] = tensor
                if wanted <= parts.keys():
                    del self._pending[module]
                    yield f"{module}.weight", self._build(module, parts)
            elif part not in DROPPED:
                yield name, tensor
        if self._pending:
            module, parts = next(iter(self._pending.items()))
            missing = sorted(wanted - parts.keys())
            raise ValueError(f"quantized weight {module!r} lacks {missing} in the checkpoint")

    def _check_not_fp8(self, name: str, tensor: LoadedWeight) -> None:
        # An e4m3 tensor without its scale would load as its bare codes, every value off by that scale.
        if isinstance(tensor, torch.Tensor) and tensor.dtype == FP8_DTYPE:
            scale = MARKER[self.scheme.kind]
            raise ValueError(
                f"checkpoint tensor {name!r} is FP8 but the checkpoint has no "
                f"{name.rpartition('.')[0]}.{scale} for it"
            )

    def _take_kv_scale(self, name: str, tensor: LoadedWeight) -> bool:
        match = KV_SCALE.match(name)
        if match is None or not isinstance(tensor, torch.Tensor):
            return False
        which = match.group(2) or match.group(3)
        self.kv_scales.setdefault(int(match.group(1)), {})[which] = float(tensor.float().max())
        return True

    def _build(self, module: str, parts: dict[str, torch.Tensor]) -> LoadedWeight:
        try:
            return self._unpack({name: tensor.to(self.device) for name, tensor in parts.items()})
        except ValueError as error:
            raise ValueError(f"quantized weight {module!r}: {error}") from error

    def _unpack(self, parts: dict[str, torch.Tensor]) -> LoadedWeight:
        kind = self.scheme.kind
        if kind == FP8:
            return fp8_weight(parts["weight"], parts["weight_scale"], parts.get("input_scale"))
        if kind == BLOCK_FP8:
            return dequantize_fp8_blocks(
                parts["weight"], parts["weight_scale_inv"], self.scheme.block, self.dtype
            )
        if kind == GPTQ:
            return unpack_gptq(
                parts["qweight"],
                parts["qzeros"],
                parts["scales"],
                self.scheme.group_size,
                self.scheme.zeros_minus_one,
                parts.get("g_idx"),
                self.scheme.bits,
            )
        if kind == AWQ:
            return unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"], self.scheme.group_size)
        if kind == CT_INT8:
            return unpack_int8_weight(parts["weight"], parts["weight_scale"], self.scheme.group_size)
        return unpack_compressed_int4(
            parts["weight_packed"],
            parts["weight_scale"],
            parts["weight_shape"],
            self.scheme.group_size,
            parts.get("weight_g_idx"),
            self.scheme.bits,
        )
