"""Give each weight-holding layer of a built model its LinearMethod, before any tensor is loaded."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping

import torch

from batchlm.kernels.quant_blocks import BLOCK
from batchlm.layers.embedding import ParallelLMHead
from batchlm.layers.moe import FusedMoE
from batchlm.layers.moe_int4 import whole_groups
from batchlm.layers.quantization.base import RowSlice
from batchlm.layers.quantization.cpu_quantized import CpuQuantizedLinearMethod
from batchlm.layers.quantization.int4 import Int4LinearMethod
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.layers.quantization.registry import (
    BLOCK_FP8_QTYPE,
    DENSE_FORMAT,
    FP8_QTYPE,
    INT4_QTYPE,
    MXFP4_QTYPE,
    QUANTIZE_AT_LOAD,
    WeightSpec,
    choose_linear_method,
)
from batchlm.models.base import CausalLM
from batchlm.models.moe import MoEForCausalLM
from batchlm.models.weights import hf_module_names


def assign_weight_methods(
    model: CausalLM,
    weight_format: str,
    qtypes: Mapping[str, str],
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None = None,
) -> Counter[str]:
    """Choose each layer's method from its checkpoint tensors' GGML types (`qtypes`: HF tensor name ->
    type name; empty for dense checkpoints). A tied LM head then takes its embedding's method and
    storage again. Returns how many layers got each method (by class name), for the log."""
    chosen: Counter[str] = Counter()
    tied_heads: list[ParallelLMHead] = []
    expert_types = _expert_types(model, qtypes)
    for path, module in model.named_modules():
        if isinstance(module, FusedMoE):
            if isinstance(model, MoEForCausalLM):
                types = tuple(sorted(expert_types.get(path, ())))
                _assign_experts_method(module, weight_format, types, device, dtype, quantization, chosen)
            if module.kept is None:
                module.allocate_dense(device)
        if not isinstance(module, MethodLayer):
            continue
        if isinstance(module, ParallelLMHead) and module.tied_embedding is not None:
            tied_heads.append(module)
            continue
        # The HF names it loads from, and its own where a checkpoint stores it fused (Phi-3's q/k/v
        # and gate/up, split only as they load).
        names = [f"{name}.weight" for name in dict.fromkeys((*hf_module_names(model, path), path))]
        spec = WeightSpec(
            weight_format,
            tuple(qtypes[n] for n in names if n in qtypes),
            module.role,
            device,
            dtype,
            quantization,
        )
        method = choose_linear_method(spec)
        if method is not module.method:
            module.set_method(method)
        chosen[type(method).__name__] += 1
    for head in tied_heads:
        assert head.tied_embedding is not None
        head.tie_to(head.tied_embedding)
    return chosen


def _expert_types(model: CausalLM, qtypes: Mapping[str, str]) -> dict[str, set[str]]:
    """Experts' module path -> the types of its projections' tensors, named stacked
    (`<path>.gate_proj.weight`) or one an expert (`<path>.<e>.gate_proj.weight`), under the family's
    checkpoint renames."""
    types: dict[str, set[str]] = defaultdict(set)
    if not isinstance(model, MoEForCausalLM):
        return types
    for name, qtype in qtypes.items():
        stem, _, projection = model.renamed(name).removesuffix(".weight").rpartition(".")
        if projection in model.expert_part_names:
            parent, _, index = stem.rpartition(".")
            types[parent if index.isdigit() else stem].add(qtype)
    return types


def _assign_experts_method(
    experts: FusedMoE,
    weight_format: str,
    types: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None,
    chosen: Counter[str],
) -> None:
    """Experts go where a linear of their GGML types would: to the quantized CPU kernels (a GGUF file's
    expert stacks, an FP8 or 4-bit checkpoint's, dense experts under --quantization int8 / fp8 /
    w4a16, in the linears' code width); MXFP4
    experts on a GPU stay MXFP4 for the grouped GEMM, FP8 and 4-bit ones (or dense ones under
    --quantization fp8 / w4a16) FP8 or 4-bit stacks; others are dense stacks."""
    spec = WeightSpec(weight_format, types, "linear", device, dtype, quantization)
    # (A rank's share of the intermediate size, under tensor parallelism.)
    whole_blocks = experts.spec.hidden_size % BLOCK == 0 and experts.inter_per_rank % BLOCK == 0
    method = choose_linear_method(spec) if device.type == "cpu" else None
    if isinstance(method, CpuQuantizedLinearMethod) and whole_blocks:
        experts.quantize_experts(method.dense_bits)
        chosen["quantized experts"] += 1
    elif device.type == "cuda" and types and set(types) == {MXFP4_QTYPE} and whole_blocks:
        experts.keep_mxfp4(device)
        chosen["MXFP4 experts"] += 1
    elif (form := gpu_experts_form(types, quantization, device)) == FP8_QTYPE:
        experts.keep_fp8(device)
        chosen["FP8 experts"] += 1
    elif form == INT4_QTYPE and whole_groups(experts.spec.hidden_size, experts.inter_per_rank):
        experts.keep_int4(device)
        chosen["INT4 experts"] += 1


def gpu_experts_form(types: tuple[str, ...], quantization: str | None, device: torch.device) -> str | None:
    """The stacks experts of these checkpoint types keep on a GPU (any NVIDIA GPU: the grouped GEMM
    widens FP8 without e4m3 instructions where the GPU lacks them): FP8_QTYPE for an FP8 checkpoint's
    experts, a block-wise FP8 checkpoint's (requantized per row, as its linears are where the GPU has
    FP8 tensor cores) and dense ones under --quantization fp8; INT4_QTYPE for a 4-bit checkpoint's and
    dense (or block-wise FP8) ones under --quantization w4a16; None for dense stacks."""
    if device.type != "cuda":
        return None
    kinds = set(types)
    if kinds == {BLOCK_FP8_QTYPE}:  # dense as they load, so --quantization applies, as to its linears
        kinds, quantization = set(), quantization or "fp8"
    if kinds == {INT4_QTYPE} or (not kinds and quantization == "w4a16"):
        return INT4_QTYPE
    fp8 = kinds == {FP8_QTYPE} or (not kinds and quantization == "fp8")
    return FP8_QTYPE if fp8 else None


def expert_types(model: CausalLM, qtype: str) -> dict[str, str]:
    """HF weight name -> `qtype` for every expert projection: the types a checkpoint whose experts are
    all `qtype` loads with (random weights in that format)."""
    if not isinstance(model, MoEForCausalLM):
        return {}
    return {
        f"{path}.{projection}.weight": qtype
        for path, module in model.named_modules()
        if isinstance(module, FusedMoE)
        for projection in model.expert_part_names
    }


def random_expert_types(model: CausalLM, quantization: str, device: torch.device) -> dict[str, str]:
    """The types random experts take under --quantization fp8 / w4a16: a checkpoint's FP8 or 4-bit
    types where its experts would be kept as stacks (a GPU: random stacks); none elsewhere, where they
    would take the CPU kernels' blocks, which random weights do not fill (random dense stacks)."""
    qtype = QUANTIZE_AT_LOAD.get(quantization)
    if qtype is None or gpu_experts_form((qtype,), None, device) is None:
        return {}
    return expert_types(model, qtype)


@torch.no_grad()
def quantize_linears(
    model: CausalLM, device: torch.device, dtype: torch.dtype, quantization: str
) -> Counter[str]:
    """Move the already loaded dense linears to the method `quantization` chooses for them (random
    weights under --quantization fp8 / w4a16), one layer at a time."""
    chosen: Counter[str] = Counter()
    for _, module in model.named_modules():
        if not isinstance(module, MethodLayer) or module.role != "linear":
            continue
        spec = WeightSpec(DENSE_FORMAT, (), module.role, device, dtype, quantization)
        method = choose_linear_method(spec)
        if method is not module.method:
            dense = module.weight.detach()
            module.set_method(method)
            rows = dense.shape[0]
            method.load_rows(module, "weight", dense, RowSlice(rows, 0, rows, 0))
        chosen[type(method).__name__] += 1
    return chosen


def finish_quantized(model: CausalLM) -> None:
    """Pack 4-bit layers for their kernel once every shard has loaded (the load-time bytes go)."""
    for module in model.modules():
        if isinstance(module, MethodLayer) and isinstance(module.method, Int4LinearMethod):
            module.process_weights_after_loading()
