"""A sparse mixture-of-experts MLP: a router picks top_k experts per token, and every expert's
gate/up and down weights live stacked in one [E, ...] tensor each, so all experts run as one grouped
GEMM per projection on the GPU (kernels/moe_gemm.py) and as one matmul per active expert on the CPU.

Tensor parallelism splits each expert's intermediate size across ranks (gate/up by rows, down by
columns), so every rank routes all tokens and one all-reduce sums the partial outputs.

The experts' weights take one of five forms, chosen per layer before loading (models/weight_methods.py):
dense stacks in the model's dtype, quantized blocks for the CPU kernels (layers/moe_quantized.py), or
MXFP4, FP8 or 4-bit stacks on a GPU (layers/moe_mxfp4.py, layers/moe_fp8.py, layers/moe_int4.py). A model built under
`stacks_allocated_later` leaves the dense stacks unallocated until that choice (`allocate_dense`), so a
GPU never holds a dense copy of experts that stay quantized.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from batchlm.kernels.fp8_stack import Fp8Stack
from batchlm.kernels.int4_stack import Int4Stack
from batchlm.kernels.mxfp4_layout import Mxfp4Stack
from batchlm.layers.activation import get_gated_activation
from batchlm.layers.linear import check_shape
from batchlm.layers.moe_fp8 import Fp8Experts
from batchlm.layers.moe_int4 import Int4Experts
from batchlm.layers.moe_mxfp4 import Mxfp4Experts

# The three projections of an expert (GATE, UP, DOWN), numbered where the quantized experts live.
from batchlm.layers.moe_quantized import DOWN as DOWN
from batchlm.layers.moe_quantized import GATE as GATE
from batchlm.layers.moe_quantized import UP as UP
from batchlm.layers.moe_quantized import QuantizedExperts, kernel_activation
from batchlm.layers.moe_routing import RoutingChoice, align_to_blocks, route_top_k, sort_by_expert
from batchlm.layers.quantization.base import LoadedWeight, as_dense, narrow_cols, narrow_rows
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup


@functools.cache
def _moe_kernels() -> ModuleType | None:
    if os.environ.get("BATCHLM_DISABLE_FUSED_OPS"):
        return None
    try:
        from batchlm.kernels import moe_gemm
    except ImportError:  # no Triton: the torch path serves every device
        return None
    return moe_gemm


# The weights the grouped GEMM reads for one projection of every expert.
GroupedWeights = torch.Tensor | Mxfp4Stack | Fp8Stack | Int4Stack

# Whether experts built now leave their dense stacks for `allocate_dense` (see the module's docstring).
_STACKS_LATER = contextvars.ContextVar("moe_stacks_later", default=False)


@contextlib.contextmanager
def stacks_allocated_later() -> Iterator[None]:
    """Experts built inside hold their dense stacks on the meta device until `allocate_dense` or a
    quantized form replaces them."""
    token = _STACKS_LATER.set(True)
    try:
        yield
    finally:
        _STACKS_LATER.reset(token)


@dataclass(frozen=True)
class MoESpec:
    """The sizes and routing rule of one sparse MLP block."""

    num_experts: int
    top_k: int
    hidden_size: int
    # Each expert's intermediate size (moe_intermediate_size in Qwen3-MoE configs).
    intermediate_size: int
    # Rescale the kept top_k weights to sum to 1.
    renormalize: bool
    hidden_act: str = "silu"
    # Options of the activation, as (name, value) pairs (gpt-oss's clamped SwiGLU: alpha and limit).
    act_options: tuple[tuple[str, float], ...] = ()
    # A bias on the router's logits (gpt-oss).
    router_bias: bool = False
    # A bias after each expert projection (gpt-oss): gate_up_proj_bias [E, 2 * I], down_proj_bias [E, H].
    expert_bias: bool = False


class FusedMoE(nn.Module):
    """The experts of one layer: gate_up_proj [E, 2 * I, H] (gate rows, then up rows) and down_proj
    [E, H, I], the names and layouts transformers uses for its stacked experts (Qwen3-MoE's, Mixtral's);
    with spec.expert_bias, gate_up_proj_bias [E, 2 * I] (gate, then up) and down_proj_bias [E, H].

    Under tensor parallelism the gate/up bias is cut as its rows are; the down bias is kept whole on
    every rank and added once, after the all-reduce, as RowParallelLinear adds its bias."""

    def __init__(self, spec: MoESpec, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        if spec.intermediate_size % tp.size:
            raise ValueError(
                f"moe intermediate size ({spec.intermediate_size}) is not divisible by the "
                f"tensor-parallel size {tp.size}"
            )
        self.spec, self.tp = spec, tp
        self.inter_per_rank = spec.intermediate_size // tp.size
        experts, hidden, inter = spec.num_experts, spec.hidden_size, self.inter_per_rank
        where = torch.device("meta") if _STACKS_LATER.get() else None
        self.gate_up_proj = nn.Parameter(
            torch.empty(experts, 2 * inter, hidden, device=where), requires_grad=False
        )
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter, device=where), requires_grad=False)
        self.act_fn = get_gated_activation(spec.hidden_act, **dict(spec.act_options))
        self.gate_up_proj_bias: nn.Parameter | None = None
        self.down_proj_bias: nn.Parameter | None = None
        if spec.expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(experts, 2 * inter), requires_grad=False)
            self.down_proj_bias = nn.Parameter(torch.zeros(experts, hidden), requires_grad=False)
        # (expert, part) pairs loaded so far, to name what a checkpoint lacks.
        self.loaded_parts: set[tuple[int, int]] = set()
        # The experts as quantized blocks for the CPU kernels, or as MXFP4, FP8 or 4-bit stacks on a
        # GPU, instead of the dense stacks.
        self.quantized: QuantizedExperts | None = None
        self.mxfp4: Mxfp4Experts | None = None
        self.fp8: Fp8Experts | None = None
        self.int4: Int4Experts | None = None

    def allocate_dense(self, device: torch.device) -> None:
        """Dense stacks on `device` where they were left unallocated (`stacks_allocated_later`)."""
        for name in ("gate_up_proj", "down_proj"):
            stack = getattr(self, name)
            if stack.is_meta:
                setattr(self, name, nn.Parameter(torch.empty_like(stack, device=device), requires_grad=False))

    def keep_mxfp4(self, device: torch.device) -> None:
        """Keep the experts as MXFP4 stacks on `device` (a checkpoint's or GGUF file's MXFP4 experts on
        a GPU); call before loading. Under tensor parallelism each rank keeps its share, its
        intermediate size whole 32-input groups."""
        spec = self.spec
        self.mxfp4 = Mxfp4Experts(spec.num_experts, spec.hidden_size, self.inter_per_rank, device)
        self._drop_dense_stacks(device)

    def keep_fp8(self, device: torch.device) -> None:
        """Keep the experts as FP8 stacks on `device` (an FP8 checkpoint's experts, or dense ones under
        --quantization fp8, on a GPU); call before loading. Under tensor parallelism each
        rank keeps its share (a scale per row, so any split)."""
        spec = self.spec
        self.fp8 = Fp8Experts(spec.num_experts, spec.hidden_size, self.inter_per_rank, device)
        self._drop_dense_stacks(device)

    def keep_int4(self, device: torch.device) -> None:
        """Keep the experts as 4-bit stacks on `device` (a 4-bit checkpoint's experts, or dense ones
        under --quantization w4a16, on a GPU); call before loading. Under tensor parallelism each
        rank keeps its share, its intermediate size whole groups."""
        spec = self.spec
        self.int4 = Int4Experts(spec.num_experts, spec.hidden_size, self.inter_per_rank, device)
        self._drop_dense_stacks(device)

    @property
    def kept(self) -> QuantizedExperts | Mxfp4Experts | Fp8Experts | Int4Experts | None:
        """The form the experts are kept in instead of dense stacks, if any."""
        return self.quantized or self.stacks

    @property
    def stacks(self) -> Mxfp4Experts | Fp8Experts | Int4Experts | None:
        """The grouped GEMM's quantized stacks (MXFP4, FP8 or 4-bit), if the experts are kept so."""
        return self.mxfp4 or self.fp8 or self.int4

    def _drop_dense_stacks(self, device: torch.device) -> None:
        """Empty dense stacks (their dtype and device kept, for what reads them)."""
        empty = torch.empty(0, dtype=self.gate_up_proj.dtype, device=device)
        self.gate_up_proj = nn.Parameter(empty, requires_grad=False)
        self.down_proj = nn.Parameter(empty.clone(), requires_grad=False)

    def quantize_experts(self, dense_bits: int = 8) -> None:
        """Keep the experts as quantized blocks on the CPU kernels (a GGUF file's experts, or dense
        ones under --quantization int8 / fp8 / w4a16: `dense_bits` 8 or 4); call before loading. Under tensor parallelism each rank
        keeps its share: gate/up rows, and down columns cut on the kernels' 32-value blocks (inside
        a K-quant's super-blocks too), so its intermediate size per rank must be whole blocks."""
        spec = self.spec
        # The fused experts kernel computes SiLU and clamped SwiGLU experts (with gate/up biases or
        # not); others go expert by expert.
        activation = kernel_activation(self.act_fn)
        self.quantized = QuantizedExperts(
            spec.num_experts, spec.hidden_size, self.inter_per_rank, activation, dense_bits
        )
        self._drop_dense_stacks(torch.device("cpu"))

    def forward(self, x: torch.Tensor, choice: RoutingChoice) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        kernels = _moe_kernels() if x.is_cuda else None
        if kernels is not None:
            out = self._forward_grouped_gemm(kernels, x, choice)
        elif self.quantized is not None:
            out = self.quantized.forward(x, choice, self.act_fn, self.gate_up_proj_bias)
        else:
            out = self._forward_per_expert(x, choice)
        return self._add_down_bias(self.tp.all_reduce(out), choice)

    def _add_down_bias(self, out: torch.Tensor, choice: RoutingChoice) -> torch.Tensor:
        """out + each token's routing-weighted sum of its experts' down biases: what adding the bias to
        every expert's output before weighting adds, computed once for every path, after the sum."""
        if self.down_proj_bias is None:
            return out
        biases = self.down_proj_bias[choice.experts].float()  # [T, k, H]
        return out + (choice.weights.unsqueeze(-1) * biases).sum(dim=1).to(out.dtype)

    def _grouped_weights(self) -> tuple[GroupedWeights, GroupedWeights]:
        """(gate_up, down) as the grouped GEMM reads them."""
        stacks = self.stacks
        if stacks is not None:
            return stacks.gate_up, stacks.down
        return self.gate_up_proj, self.down_proj

    def _forward_grouped_gemm(
        self, kernels: ModuleType, x: torch.Tensor, choice: RoutingChoice
    ) -> torch.Tensor:
        tokens, top_k = choice.experts.shape
        num_experts = self.spec.num_experts
        blocks = align_to_blocks(
            choice.experts, num_experts, kernels.block_m_for(tokens * top_k, num_experts)
        )
        gate_up_stack, down_stack = self._grouped_weights()
        gate_up = kernels.grouped_gemm(x, gate_up_stack, blocks, top_k)  # [T * k, 2 * I]
        if self.gate_up_proj_bias is not None:  # its rows are the slots in order: expert of each
            gate_up += self.gate_up_proj_bias[choice.experts.reshape(-1)]
        activated = self.act_fn(gate_up)  # [T * k, I]
        slot_weights = choice.weights.reshape(-1)
        down: torch.Tensor = kernels.grouped_gemm(activated, down_stack, blocks, 1, slot_weights)
        return down.view(tokens, top_k, -1).sum(dim=1)  # [T * k, H] -> [T, H]

    def _forward_per_expert(self, x: torch.Tensor, choice: RoutingChoice) -> torch.Tensor:
        """Slots sorted by expert; one matmul pair per expert that has tokens, on its run of rows.
        Gathering and weighting happen once for all rows, so each expert costs four ops."""
        runs = sort_by_expert(choice, self.spec.num_experts)
        picked = x[runs.tokens]  # [T * k, hidden], grouped by expert
        rows = torch.empty_like(picked)
        start = 0
        for expert, count in enumerate(runs.counts):
            if count == 0:
                continue
            end = start + count
            gate_up_weight, down_weight = self._expert_weights(expert, x.dtype)
            gate_up = picked[start:end] @ gate_up_weight.t()
            if self.gate_up_proj_bias is not None:
                gate_up += self.gate_up_proj_bias[expert]
            activated = self.act_fn(gate_up)
            torch.mm(activated, down_weight.t(), out=rows[start:end])
            start = end
        rows *= runs.weights[:, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, runs.tokens, rows)

    def _expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's dense (gate_up [2 * I, H], down [H, I]); MXFP4, FP8 and 4-bit ones widened
        now, in `dtype`."""
        stacks = self.stacks
        if stacks is not None:
            return stacks.expert_weights(expert, dtype)
        return self.gate_up_proj[expert], self.down_proj[expert]

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run the grouped GEMM once per block size and launch shape it can pick, so no serving step
        waits for a compile."""
        kernels = _moe_kernels()
        if kernels is None or not self.gate_up_proj.is_cuda:
            return
        experts, top_k = self.spec.num_experts, self.spec.top_k
        weight = self.gate_up_proj
        form = kernels.stack_form(self._grouped_weights()[0])
        for rows_per_expert in kernels.rows_per_expert_of_each_launch(form):
            tokens = max(1, int(rows_per_expert * experts) // top_k)
            x = torch.zeros((tokens, self.spec.hidden_size), dtype=weight.dtype, device=weight.device)
            logits = torch.randn((tokens, experts), device=weight.device)
            self(x, route_top_k(logits, top_k, self.spec.renormalize))

    def load_expert(self, name: str, expert: int, part: int, loaded: LoadedWeight) -> None:
        """One expert's HF projection (gate [I, H], up [I, H] or down [H, I]): this rank's share."""
        if not 0 <= expert < self.spec.num_experts:
            raise ValueError(
                f"checkpoint tensor {name!r} names expert {expert}; the model has {self.spec.num_experts}"
            )
        hidden, inter, share = self.spec.hidden_size, self.spec.intermediate_size, self.inter_per_rank
        start = self.tp.rank * share
        kept = self.kept
        if kept is not None:
            check_shape(name, (hidden, inter) if part == DOWN else (inter, hidden), loaded.shape)
            if self.tp.size != 1:  # the file's blocks, cut to this rank's share (never requantized)
                narrow = narrow_cols if part == DOWN else narrow_rows
                loaded = narrow(loaded, start, share)
            kept.put(expert, part, loaded)
            self.loaded_parts.add((expert, part))
            return
        if part == DOWN:
            check_shape(name, (hidden, inter), loaded.shape)
            dense = as_dense(loaded, self.down_proj.dtype).narrow(1, start, share)
            target = self.down_proj[expert]
        else:
            check_shape(name, (inter, hidden), loaded.shape)
            dense = as_dense(loaded, self.gate_up_proj.dtype).narrow(0, start, share)
            target = self.gate_up_proj[expert].narrow(0, part * share, share)
        with torch.no_grad():
            target.copy_(dense)
        self.loaded_parts.add((expert, part))

    def load_weight(
        self, name: str, param_name: str, loaded: LoadedWeight, shard: str | int | None = None
    ) -> None:
        """A stacked tensor in our layout, transformers' for Qwen3-MoE and Mixtral (gate_up_proj
        [E, 2I, H], down_proj [E, H, I]), or a stacked bias (gate_up_proj_bias [E, 2I], down_proj_bias
        [E, H])."""
        experts, hidden, inter = self.spec.num_experts, self.spec.hidden_size, self.spec.intermediate_size
        dense = as_dense(loaded, self.gate_up_proj.dtype)
        if param_name.endswith("_bias"):
            self._load_bias(name, param_name, dense)
        elif param_name == "down_proj":
            check_shape(name, (experts, hidden, inter), dense.shape)
            for expert in range(experts):
                self.load_expert(name, expert, DOWN, dense[expert])
        elif param_name == "gate_up_proj":
            check_shape(name, (experts, 2 * inter, hidden), dense.shape)
            for expert in range(experts):
                self.load_expert(name, expert, GATE, dense[expert, :inter])
                self.load_expert(name, expert, UP, dense[expert, inter:])
        else:
            raise ValueError(f"unexpected checkpoint tensor {name!r}: the experts have no {param_name}")

    def _load_bias(self, name: str, param_name: str, dense: torch.Tensor) -> None:
        experts, share = self.spec.num_experts, self.inter_per_rank
        if param_name == "gate_up_proj_bias" and self.gate_up_proj_bias is not None:
            inter, start = self.spec.intermediate_size, self.tp.rank * share
            check_shape(name, (experts, 2 * inter), dense.shape)
            rows = torch.cat(
                [dense[:, start : start + share], dense[:, inter + start : inter + start + share]], 1
            )
            target = self.gate_up_proj_bias
        elif param_name == "down_proj_bias" and self.down_proj_bias is not None:
            check_shape(name, (experts, self.spec.hidden_size), dense.shape)
            rows, target = dense, self.down_proj_bias
        else:
            raise ValueError(f"unexpected checkpoint tensor {name!r}: the experts have no {param_name}")
        with torch.no_grad():
            target.copy_(rows)

    def missing_parts(self) -> list[tuple[int, int]]:
        """(expert, part) pairs no checkpoint tensor has filled."""
        everything = {(e, p) for e in range(self.spec.num_experts) for p in (GATE, UP, DOWN)}
        return sorted(everything - self.loaded_parts)

    def extra_repr(self) -> str:
        s = self.spec
        return f"experts={s.num_experts}, top_k={s.top_k}, hidden={s.hidden_size}, inter={self.inter_per_rank}, tp={self.tp.size}"


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated on every rank) and experts, as HF names them."""

    def __init__(self, spec: MoESpec, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.spec = spec
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=spec.router_bias)
        self.gate.requires_grad_(False)
        self.experts = FusedMoE(spec, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> router logits [T, E] -> [T, hidden]
        choice = route_top_k(self.gate(x), self.spec.top_k, self.spec.renormalize)
        out: torch.Tensor = self.experts(x, choice)
        return out


def warm_up_experts(model: nn.Module) -> None:
    """Warm up the grouped GEMM once per distinct expert shape in `model` (layers share kernels)."""
    seen: set[MoESpec] = set()
    for module in model.modules():
        if isinstance(module, FusedMoE) and module.spec not in seen:
            seen.add(module.spec)
            module.warm_up()
