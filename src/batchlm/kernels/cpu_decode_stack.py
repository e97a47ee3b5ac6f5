"""A whole decode step of a Llama-style decoder with quantized weights in one C call
(cpu_decode_stack.c): every layer's norms, matmuls, rotary, KV-cache write, attention, SiLU (or a
mixture-of-experts layer's routing and routed experts, cpu_decode_experts.c) and residual adds, then
the final norm and optionally the LM head, with no torch op or Python in between. gpt-oss's parts
(attention sinks, the router's and the experts' biases, the clamped SwiGLU) are optional pointers and
fields, NULL or zero for the other families.

`DecodeStack` holds the C-side description of a model (pointers into its packed weights, norms and
KV caches, which must stay alive and in place); `run` takes one step's rows. The library is built
like the other CPU kernels and is only offered where the quantized matmuls and the decode attention
it shares code with passed their own probes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from batchlm.kernels.barrier_spin import spin_from_env
from batchlm.kernels.cpu_decode_attention import CACHE_DTYPES, decode_library
from batchlm.kernels.cpu_native import SOURCE, LibrarySource, pointer_of
from batchlm.kernels.cpu_quant import SOURCE_PATH, quant_isa, quant_library
from batchlm.kernels.quant_panels import PackedParts, PackedWeight, QuantizedWeight, parts_of

logger = logging.getLogger(__name__)

STACK_SOURCE = Path(__file__).with_name("cpu_decode_stack.c")
BARRIER_SOURCE = Path(__file__).with_name("cpu_stage_barrier.c")
STAGE_SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("cpu_decode_attend.c", "cpu_decode_experts.c", "cpu_row_ops.c")
)
STACK_KERNELS = LibrarySource(STACK_SOURCE, includes=(SOURCE, SOURCE_PATH, BARRIER_SOURCE, *STAGE_SOURCES))
BLOCK = 32  # sizes the kernels quantize must be whole blocks of this


@dataclass(frozen=True)
class StackShape:
    """The model's sizes and its shared tensors (float32, contiguous)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    block_size: int
    eps: float
    scale: float
    final_norm: torch.Tensor  # [hidden]
    # Mixture-of-experts layers (StackExperts): the routing rule and each expert's intermediate size;
    # experts 0 where every layer is dense.
    experts: int = 0
    top_k: int = 0
    expert_inter: int = 0
    renormalize: bool = False
    # The dense MLP's gate: GELU, tanh approximation (Gemma), else SiLU.
    gelu: bool = False
    # The leading dimensions of each head that RoPE turns (Phi-4-mini: part of the head); 0: all.
    rotary_dim: int = 0
    # The experts' activation: the kind of cpu_moe.py's ExpertActivation (SiLU * up, or gpt-oss's
    # clamped SwiGLU with its alpha and limit).
    expert_activation: int = 0
    swiglu_alpha: float = 0.0
    swiglu_limit: float = 0.0


@dataclass(frozen=True)
class StackExperts:
    """A mixture-of-experts layer's router (float32 [experts, hidden]) and its experts' packed gate/up
    ([2 * expert_inter, hidden], gate rows first) and down ([hidden, expert_inter]) weights; gpt-oss's
    biases (float32, contiguous) where the layer has them: the router's [experts], each expert's gate/up
    [2 * expert_inter] and the down biases [experts, hidden], each row's routing-weighted sum of its
    experts' added once after their sum."""

    router: torch.Tensor
    gate_up: tuple[QuantizedWeight, ...]
    down: tuple[QuantizedWeight, ...]
    router_bias: torch.Tensor | None = None
    gate_up_bias: tuple[torch.Tensor, ...] | None = None
    down_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class StackLayer:
    """One decoder layer: its norms, RoPE table, packed weights, optional biases and its KV cache; a
    dense MLP's gate_up and down, or a mixture-of-experts layer's experts. Norm weights are the factors
    the normed values are multiplied by (Gemma's 1 + weight)."""

    input_norm: torch.Tensor  # before the attention
    post_norm: torch.Tensor  # before the MLP
    cos_sin: torch.Tensor  # [max_position, rotary dimensions]
    qkv: PackedWeight
    o: PackedWeight
    gate_up: PackedWeight | None
    down: PackedWeight | None
    qkv_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    gate_up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, kv_heads, head_dim] float32 or float16
    # Per-head norms [head_dim] of the queries and keys (Qwen3, Gemma 3), or None.
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    experts: StackExperts | None = None
    # Gemma: the attention's and the MLP's outputs normed before each residual add.
    attn_out_norm: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None
    window: int = 0  # a sliding-window layer attends to a row's last `window` tokens
    softcap: float = 0.0  # Gemma 2: attention scores capped to softcap * tanh(score / softcap)
    # gpt-oss: each query head's sink logit [heads] (float32), one more score of its softmax, valueless.
    sinks: torch.Tensor | None = None


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("attn_out_norm", ctypes.c_void_p),
        ("mlp_out_norm", ctypes.c_void_p),
        ("cos_sin", ctypes.c_void_p),
        ("window", ctypes.c_long),
        ("softcap", ctypes.c_float),
        ("qkv", PackedParts),
        ("o", PackedParts),
        ("gate_up", PackedParts),
        ("down", PackedParts),
        ("qkv_bias", ctypes.c_void_p),
        ("o_bias", ctypes.c_void_p),
        ("gate_up_bias", ctypes.c_void_p),
        ("down_bias", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("router", ctypes.c_void_p),
        ("expert_gate_up", ctypes.c_void_p),
        ("expert_gate_up_layout", ctypes.c_void_p),
        ("expert_down", ctypes.c_void_p),
        ("expert_down_layout", ctypes.c_void_p),
        ("sinks", ctypes.c_void_p),
        ("router_bias", ctypes.c_void_p),
        ("expert_gate_up_bias", ctypes.c_void_p),
        ("expert_down_bias", ctypes.c_void_p),
    ]


class _Shape(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_long) for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate")),
        ("block_size", ctypes.c_long),
        ("num_layers", ctypes.c_long),
        ("kv_half", ctypes.c_long),
        *(
            (name, ctypes.c_long)
            for name in ("experts", "top_k", "expert_inter", "renormalize", "gelu", "rotary_dim")
        ),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("final_norm", ctypes.c_void_p),
        ("expert_activation", ctypes.c_long),
        ("swiglu_alpha", ctypes.c_float),
        ("swiglu_limit", ctypes.c_float),
    ]


class _Batch(ctypes.Structure):
    _fields_ = [
        ("B", ctypes.c_long),
        ("positions", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),
        ("block_tables", ctypes.c_void_p),
        ("seq_lens", ctypes.c_void_p),
        ("table_stride", ctypes.c_long),
        ("shared_context", ctypes.c_long),
    ]


def fits(shape: StackShape, kv_caches: list[torch.Tensor]) -> str | None:
    """Why the kernel cannot run this shape over these caches (of the dtypes the decode-attention
    kernel, whose cache walk it shares, reads), or None when it can."""
    sizes = (shape.hidden, shape.heads * shape.head_dim, shape.intermediate, shape.expert_inter)
    if any(size % BLOCK for size in sizes):
        return f"hidden, attention, MLP and expert sizes must be multiples of {BLOCK}"
    if shape.experts and not 0 < shape.top_k <= shape.experts:
        return "experts chosen a row must be at least one and at most all"
    if shape.head_dim % 8 or shape.heads % shape.kv_heads:
        return "head_dim must be a multiple of 8 and the query heads whole groups of KV heads"
    if shape.rotary_dim % 2 or shape.rotary_dim > shape.head_dim:
        return "the rotary dimensions must be even and within a head"
    if (
        not kv_caches
        or len({cache.dtype for cache in kv_caches}) != 1
        or kv_caches[0].dtype not in CACHE_DTYPES
    ):
        return "the KV caches must be all float32 or all float16"
    if not all(cache.is_contiguous() for cache in kv_caches):
        return "the KV caches must be contiguous"
    return None


def _mlps_fit(shape: StackShape, layers: list[StackLayer]) -> str | None:
    for layer in layers:
        experts = layer.experts
        if experts is None:
            if layer.gate_up is None or layer.down is None:
                return "a layer has neither a dense MLP nor experts"
            continue
        biases = experts.gate_up_bias
        if not len(experts.gate_up) == len(experts.down) == shape.experts == experts.router.shape[0]:
            return "a layer's experts do not match the shape's count"
        if biases is not None and len(biases) != shape.experts:
            return "a layer's experts' gate/up biases do not match the shape's count"
    return None


class DecodeStack:
    """A model's decode step in one call, with the LM head when one is given (quantized like the
    layers). Tensors handed in are referenced, not copied."""

    def __init__(self, shape: StackShape, layers: list[StackLayer], head: PackedWeight | None = None) -> None:
        library = stack_library()
        reason = fits(shape, [layer.kv_cache for layer in layers]) or _mlps_fit(shape, layers)
        if library is None or reason is not None:
            raise ValueError(reason or "the fused CPU decode kernel is not available on this machine")
        self.library = library
        self._tensors = (shape, layers, head)  # keeps every pointer below alive
        self.head = head
        self._shape = _Shape(
            shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate, shape.block_size,
            len(layers), int(layers[0].kv_cache.dtype == torch.float16),
            shape.experts, shape.top_k, shape.expert_inter, int(shape.renormalize), int(shape.gelu),
            shape.rotary_dim or shape.head_dim,
            shape.eps, shape.scale, shape.final_norm.data_ptr(),
            shape.expert_activation, shape.swiglu_alpha, shape.swiglu_limit,
        )  # fmt: skip
        self._expert_tables = [
            None if layer.experts is None else _ExpertTables(layer.experts) for layer in layers
        ]
        self._layers = (_Layer * len(layers))(*map(_layer, layers, self._expert_tables))
        self._head_parts = None if head is None else parts_of(head)
        self.hidden = shape.hidden
        self.spin = spin_from_env()
        self._waits = (ctypes.c_int * 2)()

    def run(
        self,
        hidden: torch.Tensor,  # [B, hidden] float32 contiguous: embeddings in, final-normed out
        positions: torch.Tensor,  # [B] int64
        slots: torch.Tensor,  # [B] int64
        block_tables: torch.Tensor,  # [B, max_blocks] int32, rows contiguous
        seq_lens: torch.Tensor,  # [B] int32
        shared_context: bool = False,  # rows of one request (a verify chunk as decode rows)
    ) -> torch.Tensor | None:
        """With a head: the logits [B, head.out_features] (float32); else None."""
        rows = hidden.shape[0]
        head = self.head
        logits = None if head is None else torch.empty(rows, head.out_features, dtype=torch.float32)
        batch = _Batch(
            rows, positions.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
            block_tables.stride(0), int(shared_context),
        )  # fmt: skip
        spin_ns = self.spin.budget_ns()
        status = self.library.batchlm_decode_stack(
            ctypes.byref(self._shape), self._layers, ctypes.byref(batch), hidden.data_ptr(),
            None if self._head_parts is None else ctypes.byref(self._head_parts),
            0 if head is None else head.out_features, pointer_of(logits),
            torch.get_num_threads(), quant_isa(), spin_ns, self._waits,
        )  # fmt: skip
        if status != 0:
            raise MemoryError("no memory for the fused decode step's scratch")
        self.spin.record(spin_ns, self._waits[0], self._waits[1])
        return logits


class _ExpertTables:
    """The C arrays of a layer's experts' weight pointers, layouts and biases (kept alive with the
    stack)."""

    def __init__(self, experts: StackExperts) -> None:
        count = len(experts.gate_up)
        pointers, layouts = ctypes.c_void_p * count, ctypes.c_int * count
        self.gate_up = pointers(*(weight.data.data_ptr() for weight in experts.gate_up))
        self.gate_up_layout = layouts(*(weight.layout for weight in experts.gate_up))
        self.down = pointers(*(weight.data.data_ptr() for weight in experts.down))
        self.down_layout = layouts(*(weight.layout for weight in experts.down))
        self.router = experts.router.data_ptr()
        self.router_bias = pointer_of(experts.router_bias)
        biases = experts.gate_up_bias
        self.gate_up_bias = None if biases is None else pointers(*(bias.data_ptr() for bias in biases))
        self.down_bias = pointer_of(experts.down_bias)


def _parts(weight: PackedWeight | None) -> PackedParts:
    return PackedParts() if weight is None else parts_of(weight)


def _layer(layer: StackLayer, experts: _ExpertTables | None) -> _Layer:
    keys, values = layer.kv_cache[0], layer.kv_cache[1]
    weights = (layer.qkv, layer.o, layer.gate_up, layer.down)
    address = ctypes.addressof
    return _Layer(
        layer.input_norm.data_ptr(), layer.post_norm.data_ptr(),
        pointer_of(layer.attn_out_norm), pointer_of(layer.mlp_out_norm), layer.cos_sin.data_ptr(), layer.window,
        layer.softcap,
        *(_parts(weight) for weight in weights),
        pointer_of(layer.qkv_bias), pointer_of(layer.o_bias), pointer_of(layer.gate_up_bias), pointer_of(layer.down_bias),
        keys.data_ptr(), values.data_ptr(), pointer_of(layer.q_norm), pointer_of(layer.k_norm),
        *(
            (None,) * 5 if experts is None else (
                experts.router, address(experts.gate_up), address(experts.gate_up_layout),
                address(experts.down), address(experts.down_layout),
            )
        ),
        pointer_of(layer.sinks),
        *(
            (None,) * 3 if experts is None else (
                experts.router_bias, None if experts.gate_up_bias is None else address(experts.gate_up_bias),
                experts.down_bias,
            )
        ),
    )  # fmt: skip


@functools.cache
def stack_library() -> ctypes.CDLL | None:
    """The fused decode library, or None where its parts are unavailable or it cannot be built."""
    if quant_library() is None or decode_library() is None:
        return None
    try:
        path = STACK_KERNELS.build()
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("fused CPU decode kernel unavailable (%s); decoding layer by layer", error)
        return None
    pointer = ctypes.c_void_p
    library.batchlm_decode_stack.argtypes = [
        pointer, pointer, pointer, pointer,  # shape, layers, batch, hidden
        pointer, ctypes.c_long, pointer,  # the LM head's parts or NULL, outputs, logits
        ctypes.c_int, ctypes.c_int, ctypes.c_long, pointer,  # threads, isa, spin ns, waits
    ]  # fmt: skip
    library.batchlm_decode_stack.restype = ctypes.c_int
    library.batchlm_moe_experts.argtypes = [
        pointer, ctypes.c_long, ctypes.c_long, ctypes.c_long,  # x, tokens, hidden, expert intermediate
        ctypes.c_int, pointer, pointer, pointer,  # active experts, their first slots (+ the end), slot tokens, weights
        pointer, pointer, pointer, pointer,  # gate/up weights and layouts, down weights and layouts
        pointer, ctypes.c_int, ctypes.c_float, ctypes.c_float,  # gate/up biases or NULL, activation, alpha, limit
        pointer, ctypes.c_int, ctypes.c_int, ctypes.c_long, pointer,  # y, threads, isa, spin ns, waits
    ]  # fmt: skip
    library.batchlm_moe_experts.restype = ctypes.c_int
    floats, long, int_ = ctypes.c_float, ctypes.c_long, ctypes.c_int
    library.batchlm_rows_rms_norm.argtypes = [
        pointer, long, pointer, pointer, pointer,  # x, its token stride, residual, sum, factor
        floats, pointer, long, long, long, int_,  # eps, out, tokens, rows a token, n, threads
    ]  # fmt: skip
    library.batchlm_rows_rms_norm.restype = None
    library.batchlm_rows_gate_mul.argtypes = [pointer, long, pointer, long, long, int_, int_]
    library.batchlm_rows_gate_mul.restype = None
    return library
