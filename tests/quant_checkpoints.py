"""Write quantized checkpoints the way GPTQ, AWQ and compressed-tensors tools store them, from a
dense random model, so tests know every code, scale and zero point the loader must recover.

The packers here are written independently of the loader's unpackers (slot by slot over strided
views), so a layout mistake on either side shows up as a mismatch.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchlm.layers.quantization import registry
from batchlm.layers.quantization.forms import Int4Weight, Int8Weight, quantize_fp8_rows
from batchlm.models.loader import LoadedModel, load_model
from models_harness import CPU, PROMPTS, Chunk, make_kv_caches, run_step

# The linears quantized checkpoints quantize (embedding, norms and LM head stay dense).
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The checkpoint modules a fused layer loads, in its row order.
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
T = TypeVar("T")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def shard_references(references: Mapping[str, T], path: str) -> list[T]:
    """What a test wrote for each checkpoint module the layer at `path` loads, in its row order."""
    parent, _, leaf = path.rpartition(".")
    return [references[f"{parent}.{shard}"] for shard in FUSED_SHARDS.get(leaf, (leaf,))]


def methods_as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's FP8 and 4-bit layers take the FP8 and W4A16 methods (and its experts the dense
    or GPU forms) on this CPU, as on a GPU: our quantized CPU kernels would take them here."""
    monkeypatch.setattr(registry, "_on_cpu_kernels", lambda spec, kinds: None)


def to_int32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the same bits as int32."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def pack_slots(values: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[rows, 8 C] small ints -> [rows, C] int32; slot i of word c holds value 8 c + order[i]."""
    word = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for slot, source in enumerate(order):
        word |= values[:, source::8].to(torch.int64) << (4 * slot)
    return to_int32(word)


def pack_bytes(values: torch.Tensor) -> torch.Tensor:
    """[rows, 4 C] values 0..255 -> [rows, C] int32; byte i of word c holds value 4 c + i."""
    word = torch.zeros(values.shape[0], values.shape[1] // 4, dtype=torch.int64)
    for slot in range(4):
        word |= values[:, slot::4].to(torch.int64) << (8 * slot)
    return to_int32(word)


def random_int8(rows: int, cols: int, group_size: int, seed: int, symmetric: bool = False) -> Int8Weight:
    """Random 8-bit codes and zero points (1..256: GPTQ stores zero - 1, a byte; symmetric: 128) in
    groups."""
    generator = torch.Generator().manual_seed(seed)
    groups = cols // group_size
    codes = torch.randint(0, 256, (rows, cols), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(rows, groups, generator=generator) * 0.001 + 0.0002).to(torch.float16)
    zeros = torch.randint(1, 257, (rows, groups), generator=generator, dtype=torch.int16)
    if symmetric:
        zeros = torch.full_like(zeros, 128)
    return Int8Weight(codes, scales, zeros, group_size)


def compressed_int8_tensors(w: Int8Weight) -> dict[str, torch.Tensor]:
    """pack-quantized W8A16: signed values stored plus 128 (the codes themselves for zero point 128),
    four a word."""
    return {
        "weight_packed": pack_bytes(w.codes),
        "weight_scale": w.scales.contiguous(),
        "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }


def gptq8_tensors(w: Int8Weight) -> dict[str, torch.Tensor]:
    """GPTQ's 8-bit format: four codes a word along the inputs, zeros minus one along the outputs."""
    return {
        "qweight": pack_bytes(w.codes).t().contiguous(),  # [in / 4, out]
        "qzeros": pack_bytes((w.zeros.to(torch.int64) - 1).t().contiguous()),  # [groups, out / 4]
        "scales": w.scales.t().contiguous(),
        "g_idx": torch.arange(w.shape[1], dtype=torch.int32) // w.group_size,
    }


def random_int4(rows: int, cols: int, group_size: int, symmetric: bool, seed: int) -> Int4Weight:
    generator = torch.Generator().manual_seed(seed)
    groups = cols // group_size
    codes = torch.randint(0, 16, (rows, cols), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(rows, groups, generator=generator) * 0.02 + 0.005).to(torch.float16)
    if symmetric:
        zeros = torch.full((rows, groups), 8, dtype=torch.uint8)
    else:
        zeros = torch.randint(1, 16, (rows, groups), generator=generator, dtype=torch.uint8)
    return Int4Weight(codes, scales, zeros, group_size)


def gptq_tensors(w: Int4Weight) -> dict[str, torch.Tensor]:
    """Original GPTQ format: zeros stored minus one."""
    return {
        "qweight": pack_slots(w.codes).t().contiguous(),  # [in / 8, out]
        "qzeros": pack_slots((w.zeros.to(torch.int64) - 1).t().contiguous()),  # [groups, out / 8]
        "scales": w.scales.t().contiguous(),
        "g_idx": torch.arange(w.shape[1], dtype=torch.int32) // w.group_size,
    }


@dataclass(frozen=True)
class ActOrdered:
    """A 4-bit weight as an act-order quantizer leaves it: `grouped` holds the codes in the order the
    quantizer visited the inputs (its groups are runs of that order), `visited[j]` the input its
    column j multiplies. `codes`, `zeros`, `scales` and `group_size` are what the packers read."""

    grouped: Int4Weight
    visited: torch.Tensor

    @property
    def codes(self) -> torch.Tensor:  # in input order
        codes = torch.empty_like(self.grouped.codes)
        codes[:, self.visited] = self.grouped.codes
        return codes

    @property
    def zeros(self) -> torch.Tensor:
        return self.grouped.zeros

    @property
    def scales(self) -> torch.Tensor:
        return self.grouped.scales

    @property
    def group_size(self) -> int:
        return self.grouped.group_size

    @property
    def shape(self) -> torch.Size:
        return self.grouped.shape

    def g_idx(self) -> torch.Tensor:
        """Each input's group."""
        groups = torch.empty(self.shape[1], dtype=torch.int32)
        groups[self.visited] = torch.arange(self.shape[1], dtype=torch.int32) // self.group_size
        return groups

    def dequantize(self) -> torch.Tensor:
        """The values in input order: input visited[j] takes column j's."""
        values = torch.empty(self.shape, dtype=torch.float32)
        values[:, self.visited] = self.grouped.dequantize()
        return values


def act_ordered(w: Int4Weight, module: str) -> ActOrdered:
    """`w` as visited in a random input order, one per layer input: a quantizer orders inputs by their
    activations, so q/k/v (and gate/up), which share theirs, share an order."""
    parent, _, leaf = module.rpartition(".")
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    seed = zlib.crc32(f"{parent}.{shared.get(leaf, leaf)}".encode())
    return ActOrdered(w, torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed)))


def int8_config(fmt: str, group: int) -> dict[str, Any]:
    """config.json's quantization_config of an 8-bit GPTQ ("gptq") checkpoint, a W8A16 compressed-tensors
    pack-quantized one ("ct"), or an int-quantized one: "w8a16" per group, "w8a8" per channel with
    dynamic per-token int8 activations (RedHatAI's quantized.w8a8 releases)."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 8, "group_size": group, "desc_act": False, "sym": False}
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    if fmt == "ct":
        return compressed_config(weights, None, "pack-quantized")
    if fmt == "w8a16":
        return compressed_config(weights, None, "int-quantized")
    channel = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    tokens = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return compressed_config(channel, tokens, "int-quantized")


def int_quantized_tensors(w: Int8Weight) -> dict[str, torch.Tensor]:
    """int-quantized: the signed values as int8 (codes minus the zero point 128), scales per group (a
    row's one group: per channel, [out, 1])."""
    return {"weight": (w.codes.to(torch.int16) - 128).to(torch.int8), "weight_scale": w.scales.contiguous()}


def act_order_config(fmt: str, group: int) -> dict[str, Any]:
    """config.json's quantization_config of an act-order GPTQ ("gptq") or compressed-tensors ("ct")
    checkpoint."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": False}
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    return compressed_config({**weights, "actorder": "group"}, None, "pack-quantized")


def gptq_act_order_tensors(w: ActOrdered) -> dict[str, torch.Tensor]:
    return {**gptq_tensors(w), "g_idx": w.g_idx()}


def compressed_act_order_tensors(w: ActOrdered) -> dict[str, torch.Tensor]:
    return {**compressed_int4_tensors(w), "weight_g_idx": w.g_idx()}


def awq_tensors(w: Int4Weight) -> dict[str, torch.Tensor]:
    return {
        "qweight": pack_slots(w.codes.t().contiguous(), AWQ_ORDER),  # [in, out / 8]
        "qzeros": pack_slots(w.zeros.t().contiguous(), AWQ_ORDER),  # [groups, out / 8]
        "scales": w.scales.t().contiguous(),
    }


def compressed_int4_tensors(w: Int4Weight) -> dict[str, torch.Tensor]:
    """pack-quantized: signed values stored plus 8 (the codes themselves for zero point 8)."""
    return {
        "weight_packed": pack_slots(w.codes),
        "weight_scale": w.scales.contiguous(),
        "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }


def fp8_tensors(weight: torch.Tensor, per_tensor: bool, input_scale: float | None) -> dict[str, torch.Tensor]:
    if per_tensor:
        scale = weight.float().abs().max() / 448.0
        out = {
            "weight": (weight.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn),
            "weight_scale": scale.reshape(1),
        }
    else:
        fp8 = quantize_fp8_rows(weight)
        out = {"weight": fp8.data, "weight_scale": fp8.scale[:, None].clone()}
    if input_scale is not None:
        out["input_scale"] = torch.tensor([input_scale], dtype=torch.float32)
    return out


def block_fp8_tensors(
    weight: torch.Tensor, block: tuple[int, int]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """transformers' fine-grained FP8 of a dense [N, K] weight, one block at a time: each block of
    `block` (rows, inputs; the last ones partial where N or K is not a multiple) maps its largest
    magnitude to 448, and weight_scale_inv [ceil(N / bn), ceil(K / bk)] holds amax / 448. Returns
    the stored tensors and the float32 weight they stand for (codes times their block's scale)."""
    rows, cols = weight.shape
    block_rows, block_cols = block
    grid = (-(-rows // block_rows), -(-cols // block_cols))
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(grid, dtype=torch.float32)
    values = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            where = (slice(i * block_rows, (i + 1) * block_rows), slice(j * block_cols, (j + 1) * block_cols))
            tile = weight[where].float()
            scale = tile.abs().max().clamp(min=1e-12) / 448.0
            tile_codes = (tile / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            codes[where], scales[i, j] = tile_codes, scale
            values[where] = tile_codes.float() * scale
    return {"weight": codes, "weight_scale_inv": scales}, values


def block_fp8_config(block: tuple[int, int]) -> dict[str, Any]:
    """config.json's quantization_config as transformers' FineGrainedFP8Config writes it."""
    return {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": ["lm_head"],
    }


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS


def rewrite_checkpoint(
    dense_dir: Path, out_dir: Path, quantization_config: dict[str, Any], convert: Any
) -> dict[str, Any]:
    """Copy dense_dir to out_dir with each linear weight replaced by convert(name, weight) -> (parts,
    reference), where parts are the stored tensors and reference what the loader must rebuild."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(dense_dir / "model.safetensors"))
    stored: dict[str, torch.Tensor] = {}
    references: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if not is_linear(name):
            stored[name] = tensor
            continue
        module = name.removesuffix(".weight")
        parts, references[module] = convert(module, tensor)
        stored.update({f"{module}.{part}": value for part, value in parts.items()})
    save_file(stored, str(out_dir / "model.safetensors"))
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config))
    for other in dense_dir.iterdir():  # tokenizer and generation config, where the model has them
        if other.is_file() and other.name not in ("config.json", "model.safetensors"):
            shutil.copy(other, out_dir / other.name)
    return references


def replace_lm_head(model_dir: Path, parts: dict[str, torch.Tensor]) -> None:
    """Replace the checkpoint's lm_head.weight with `parts` (quantized ones: GPTQ's lm_head option)."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["lm_head.weight"]
    tensors.update({f"lm_head.{part}": value for part, value in parts.items()})
    save_file(tensors, str(model_dir / "model.safetensors"))


def compressed_config(weights: dict[str, Any], inputs: dict[str, Any] | None, fmt: str) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}
        },
        "ignore": ["lm_head"],
    }


def dense_twin(dense_dir: Path, out_dir: Path, values: dict[str, torch.Tensor]) -> LoadedModel:
    """The dense checkpoint with each linear (and an LM head in `values`) replaced by `values[module]`
    (what its quantized form stands for), loaded on the CPU in float32."""
    rewrite_checkpoint(dense_dir, out_dir, {}, lambda module, _: ({"weight": values[module]}, None))
    if "lm_head" in values:
        replace_lm_head(out_dir, {"weight": values["lm_head"]})
    config = json.loads((out_dir / "config.json").read_text())
    del config["quantization_config"]
    (out_dir / "config.json").write_text(json.dumps(config))
    return load_model(out_dir, torch.float32, CPU, progress=False)


def two_prompt_logits(loaded: LoadedModel) -> torch.Tensor:
    """The logits of one prefill step of two prompts' chunks."""
    caches = make_kv_caches(loaded, 16)
    return run_step(
        loaded.model, caches, [Chunk(PROMPTS[0], 0, [0, 1]), Chunk(PROMPTS[1], 0, [2, 3, 4, 5, 6, 7])]
    )


def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor, share: float) -> None:
    """Within `share` of the reference's largest logit, and the same top token wherever the
    reference's top two are further apart than that."""
    tolerance = share * reference.abs().max()
    assert (ours - reference).abs().max() <= tolerance
    top2 = reference.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > tolerance
    assert torch.equal(ours.argmax(-1)[decided], reference.argmax(-1)[decided])
