"""Quantized safetensors checkpoints: which scheme config.json declares, which weights it quantized,
and the stream of tensors regrouped so that each quantized weight reaches its layer as one object.

A quantized linear is stored as several tensors (GPTQ: qweight, qzeros, scales; FP8: weight,
weight_scale and maybe input_scale; ...). `assemble` buffers them per module until all parts are
there, then hands the loader `<module>.weight` as an Fp8Weight or Int4Weight; every other tensor
passes through. Per-layer KV-cache scales (`self_attn.k_scale` / `v_scale`) are taken out of the
stream and kept for the FP8 KV cache.
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
from batchlm.layers.quantization.forms import Fp8Weight
from batchlm.layers.quantization.registry import FP8_QTYPE, INT4_QTYPE
from batchlm.models.checkpoint import open_safetensors
from batchlm.models.int4_formats import unpack_awq, unpack_compressed_int4, unpack_gptq

FP8 = "fp8"  # compressed-tensors FP8 W8A8 (FP8_DYNAMIC or static per-tensor)
GPTQ = "gptq"
AWQ = "awq"
CT_INT4 = "compressed-int4"  # compressed-tensors pack-quantized W4A16
# The tensors that make up one quantized weight, by scheme.
PARTS = {
    FP8: ("weight", "weight_scale"),
    GPTQ: ("qweight", "qzeros", "scales"),
    AWQ: ("qweight", "qzeros", "scales"),
    CT_INT4: ("weight_packed", "weight_scale", "weight_shape"),
}
# Tensors whose presence marks a module as quantized, by scheme.
MARKER = {FP8: "weight_scale", GPTQ: "qweight", AWQ: "qweight", CT_INT4: "weight_packed"}
SUPPORTED = (
    "compressed-tensors FP8 W8A8 (FP8_DYNAMIC, static per-tensor FP8), compressed-tensors W4A16 "
    "pack-quantized (symmetric), GPTQ 4-bit (desc_act false) and AWQ 4-bit (GEMM)"
)
# Parts that carry nothing once the scheme is known: GPTQ's g_idx (k // group with desc_act false), a
# dynamic scheme's stray input_scale, a symmetric scheme's zero points (all zero).
DROPPED = frozenset({"g_idx", "input_scale", "weight_zero_point"})
KV_SCALE = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.(?:([kv])_scale|([kv])_proj\.output_scale)$")


@dataclass(frozen=True)
class CheckpointScheme:
    """The quantization a checkpoint declares (config.json's quantization_config)."""

    kind: str  # FP8, GPTQ, AWQ or CT_INT4
    group_size: int = 0  # 4-bit: inputs per group (0: one group per row)
    static_activations: bool = False  # FP8: a stored input_scale per layer
    zeros_minus_one: bool = True  # GPTQ: the original format stores zero - 1

    @property
    def weight_type(self) -> str:
        return FP8_QTYPE if self.kind == FP8 else INT4_QTYPE


def read_checkpoint_scheme(model_dir: Path) -> CheckpointScheme | None:
    """The checkpoint's scheme, None for an unquantized one; ValueError naming an unsupported one."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text()).get("quantization_config")
    if not config:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(config)
    if method == "gptq":
        return _gptq_scheme(config)
    if method == "awq":
        return _awq_scheme(config)
    raise ValueError(f"quantization method {method!r} is not supported; batchlm serves {SUPPORTED}")


def _unsupported(method: str, detail: str) -> ValueError:
    return ValueError(f"{method} checkpoint with {detail} is not supported; batchlm serves {SUPPORTED}")


def _gptq_scheme(config: dict[str, Any]) -> CheckpointScheme:
    if int(config.get("bits", 4)) != 4:
        raise _unsupported("GPTQ", f"{config.get('bits')}-bit weights")
    if config.get("desc_act"):
        raise _unsupported("GPTQ", "desc_act true (act-order)")
    group_size = int(config.get("group_size", 128))
    v2 = str(config.get("checkpoint_format", "gptq")) == "gptq_v2"
    return CheckpointScheme(GPTQ, group_size=group_size, zeros_minus_one=not v2)


def _awq_scheme(config: dict[str, Any]) -> CheckpointScheme:
    bits = int(config.get("bits", config.get("w_bit", 4)))
    version = str(config.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise _unsupported("AWQ", f"{bits}-bit weights in the {version!r} layout")
    if not config.get("zero_point", True):
        raise _unsupported("AWQ", "zero_point false")
    return CheckpointScheme(AWQ, group_size=int(config.get("group_size", config.get("q_group_size", 128))))


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
    if weights.get("type") == "int" and weights.get("num_bits") == 4 and not inputs:
        fmt = group.get("format") or config.get("format")
        if fmt != "pack-quantized" or not weights.get("symmetric", True) or weights.get("actorder"):
            raise _unsupported("compressed-tensors", _describe(group) + f", format {fmt}")
        if weights.get("strategy") not in ("group", "channel"):
            raise _unsupported("compressed-tensors", _describe(group))
        group_size = int(weights.get("group_size") or 0) if weights.get("strategy") == "group" else 0
        return CheckpointScheme(CT_INT4, group_size=group_size)
    raise _unsupported("compressed-tensors", _describe(group))


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
    """HF weight name -> FP8_QTYPE / INT4_QTYPE for each module the checkpoint quantized."""
    marker = MARKER[scheme.kind]
    return {
        f"{name.removesuffix('.' + marker)}.weight": scheme.weight_type
        for name in names
        if name.endswith("." + marker)
    }


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
    kv_scales: dict[int, dict[str, float]] = field(default_factory=dict)
    _pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def run(self, weights: Iterable[tuple[str, LoadedWeight]]) -> Iterator[tuple[str, LoadedWeight]]:
        wanted = set(PARTS[self.scheme.kind]) | ({"input_scale"} if self.scheme.static_activations else set())
        for name, tensor in weights:
            if self._take_kv_scale(name, tensor):
                continue
            module, _, part = name.rpartition(".")
            if module not in self.quantized or not isinstance(tensor, torch.Tensor):
                yield name, tensor
            elif part in wanted:
                parts = self._pending.setdefault(module, {})
                parts[part] = tensor
                if wanted <= parts.keys():
                    del self._pending[module]
                    yield f"{module}.weight", self._build(parts)
            elif part not in DROPPED:
                yield name, tensor
        if self._pending:
            module, parts = next(iter(self._pending.items()))
            missing = sorted(wanted - parts.keys())
            raise ValueError(f"quantized weight {module!r} lacks {missing} in the checkpoint")

    def _take_kv_scale(self, name: str, tensor: LoadedWeight) -> bool:
        match = KV_SCALE.match(name)
        if match is None or not isinstance(tensor, torch.Tensor):
            return False
        which = match.group(2) or match.group(3)
        self.kv_scales.setdefault(int(match.group(1)), {})[which] = float(tensor.float().max())
        return True

    def _build(self, parts: dict[str, torch.Tensor]) -> LoadedWeight:
        parts = {name: tensor.to(self.device) for name, tensor in parts.items()}
        kind = self.scheme.kind
        if kind == FP8:
            return fp8_weight(parts["weight"], parts["weight_scale"], parts.get("input_scale"))
        if kind == GPTQ:
            return unpack_gptq(
                parts["qweight"],
                parts["qzeros"],
                parts["scales"],
                self.scheme.group_size,
                self.scheme.zeros_minus_one,
            )
        if kind == AWQ:
            return unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"], self.scheme.group_size)
        return unpack_compressed_int4(
            parts["weight_packed"], parts["weight_scale"], parts["weight_shape"], self.scheme.group_size
        )


def fp8_weight(weight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None) -> Fp8Weight:
    """An FP8 weight with a per-channel ([out, 1]) or per-tensor (one value) scale."""
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"an FP8 weight must be stored as float8_e4m3fn, not {weight.dtype}")
    rows = weight.shape[0]
    scale = scale.float().reshape(-1)
    if scale.numel() not in (1, rows):
        raise ValueError(
            f"weight_scale has {scale.numel()} values for {rows} rows (per-channel or per-tensor only)"
        )
    scale = scale.expand(rows).contiguous()
    static = None if input_scale is None else float(input_scale.float().max())
    return Fp8Weight(weight, scale, static)
