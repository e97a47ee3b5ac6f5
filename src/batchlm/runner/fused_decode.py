"""The CPU runner's fused decode path: steps that only decode, for up to MAX_ROWS requests, of a Llama-style
model whose linears all run on the quantized CPU kernels (a mixture-of-experts model's experts
included) go through one C call for the whole stack (kernels/cpu_decode_stack.py) instead of the
model's forward. Every other step, model or device keeps the generic path.

At one or a few requests a decode step of a small model is mostly per-layer overhead between the
matmuls (BENCHMARKS.md, "CPU: quantized GGUF models against llama-server"); the more rows, the more the
matmuls dominate, and past MAX_ROWS the fused call's gain was not measured.
"""

from __future__ import annotations

import logging
import os

import torch

from batchlm.attention.backend import AttentionBackend
from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.kernels.cpu_decode_stack import (
    DecodeStack,
    StackExperts,
    StackLayer,
    StackShape,
    fits,
    stack_library,
)
from batchlm.kernels.quant_panels import PackedWeight
from batchlm.layers.activation import SiluAndMul
from batchlm.layers.moe import MoESpec, SparseMoeBlock
from batchlm.layers.norm import RMSNorm
from batchlm.layers.quantization.cpu_quantized import CPU_QUANTIZED, store
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from batchlm.runner.inputs import StepInputs

logger = logging.getLogger(__name__)

DISABLE_ENV = "BATCHLM_CPU_FUSED_DECODE"  # 0/false/off/no: always the generic path (A/B runs)
MAX_ROWS = 32  # decode steps of at most this many requests take the fused path
# Verify steps laid out as decode rows (runner/decode_rows.py) of at most this many rows take it too:
# one verify chunk of the CPU's default 1 + 7 tokens.
MAX_VERIFY_ROWS = 8


class FusedDecode:
    """Runs eligible steps through a DecodeStack; `can_run` says which."""

    def __init__(self, model: LlamaForCausalLM, stack: DecodeStack) -> None:
        self.model = model
        self.stack = stack

    def can_run(self, inputs: StepInputs) -> bool:
        meta = inputs.meta
        rows = meta.num_decodes
        return (
            0 < rows <= (MAX_VERIFY_ROWS if inputs.has_drafts else MAX_ROWS)
            and meta.num_requests == rows
            and meta.num_tokens == rows
            and inputs.input_ids.shape[0] == rows
            and inputs.sample_indices.shape[0] == rows
        )

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [B, vocab] of a step that can_run accepted."""
        meta = inputs.meta
        hidden = self.model.model.embed_tokens(inputs.input_ids).float().contiguous()
        tables = meta.block_tables if meta.block_tables.stride(-1) == 1 else meta.block_tables.contiguous()
        logits = self.stack.run(
            hidden,
            inputs.positions.to(torch.int64).contiguous(),
            meta.slot_mapping.to(torch.int64).contiguous(),
            tables.to(torch.int32),
            meta.seq_lens.to(torch.int32).contiguous(),
            # Rows of one verify chunk read each other's keys: all are stored before any attends.
            shared_context=inputs.has_drafts,
        )
        if logits is None:
            return self.model.compute_logits(hidden)
        return logits[:, : self.model.lm_head.vocab_size]


def build_fused_decode(
    model: torch.nn.Module, kv_caches: list[torch.Tensor], attn: AttentionBackend
) -> FusedDecode | None:
    """The fused path for this model and cache, or None (logged) where it does not apply."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "false", "off", "no"):
        return None
    reason = _unsupported(model, kv_caches, attn)
    if reason is None and stack_library() is None:
        reason = "the fused CPU decode kernel is unavailable"
    if reason is not None:
        logger.info("CPU decode: layer by layer (%s)", reason)
        return None
    assert isinstance(model, LlamaForCausalLM)
    shape = _shape(model, kv_caches[0])
    reason = fits(shape, kv_caches)
    if reason is not None:
        logger.info("CPU decode: layer by layer (%s)", reason)
        return None
    layers = [_layer(layer, cache) for layer, cache in zip(model.model.layers, kv_caches, strict=True)]
    logger.info("CPU decode: steps of up to %d requests run the whole stack in one fused call", MAX_ROWS)
    return FusedDecode(model, DecodeStack(shape, layers, _head(model)))


def _unsupported(model: torch.nn.Module, kv_caches: list[torch.Tensor], attn: AttentionBackend) -> str | None:
    if not isinstance(model, LlamaForCausalLM) or not isinstance(attn, TorchAttentionBackend):
        return "not a Llama-style model on the CPU attention backend"
    first_rope = None
    moe_specs: set[MoESpec] = set()
    for layer in model.model.layers:
        assert isinstance(layer, LlamaDecoderLayer)
        attention, mlp = layer.self_attn, layer.mlp
        if isinstance(mlp, SparseMoeBlock):
            if (reason := _unsupported_experts(mlp)) is not None:
                return reason
            moe_specs.add(mlp.spec)
        elif not isinstance(mlp, LlamaMLP):
            return "an MLP other than the dense or mixture-of-experts one"
        if len(moe_specs) > 1:
            return "mixture-of-experts layers of different shapes"
        if attention.spec.sliding_window is not None or attention.spec.logit_softcap is not None:
            return "a sliding window or soft-capped attention"
        first_rope = first_rope or attention.rotary_emb
        if attention.rotary_emb is not first_rope or first_rope.rotary_dim != attention.head_dim:
            return "per-layer or partial rotary embeddings"
        linears = [attention.qkv_proj, attention.o_proj]
        if isinstance(mlp, LlamaMLP):
            linears += [mlp.gate_up_proj, mlp.down_proj]
            if not isinstance(mlp.act_fn, SiluAndMul):
                return "an activation other than SiLU"
        if not all(isinstance(m, MethodLayer) and m.method is CPU_QUANTIZED for m in linears):
            return "not every linear runs on the quantized CPU kernels"
        if attention.q_norm is not None and not _plain_head_norms(attention, layer.input_layernorm.eps):
            return "q/k norms other than plain RMSNorm at the layers' epsilon"
        if not attention.qkv_proj.tp.is_single:
            return "tensor parallel"
    return None


def _unsupported_experts(block: SparseMoeBlock) -> str | None:
    experts = block.experts.quantized
    if experts is None or experts.kernel is None:
        return "mixture-of-experts layers whose experts are not quantized SiLU experts on the CPU kernels"
    if block.gate.bias is not None:
        return "a router with a bias"
    return None


def _shape(model: LlamaForCausalLM, kv_cache: torch.Tensor) -> StackShape:
    layers = model.model.layers
    first = layers[0]
    assert isinstance(first, LlamaDecoderLayer)
    attention = first.self_attn
    dense = [layer.mlp for layer in layers if isinstance(layer.mlp, LlamaMLP)]
    sparse: list[MoESpec] = [layer.mlp.spec for layer in layers if isinstance(layer.mlp, SparseMoeBlock)]
    spec = sparse[0] if sparse else None
    return StackShape(
        hidden=model.model.norm.weight.shape[0],
        heads=attention.num_heads,
        kv_heads=attention.num_kv_heads,
        head_dim=attention.head_dim,
        intermediate=dense[0].down_proj.input_size_per_rank if dense else 0,
        block_size=kv_cache.shape[2],
        eps=float(first.input_layernorm.eps),
        scale=float(attention.spec.scale),
        cos_sin=_float32(attention.rotary_emb.cos_sin_cache),
        final_norm=_float32(model.model.norm.weight),
        experts=spec.num_experts if spec else 0,
        top_k=spec.top_k if spec else 0,
        expert_inter=spec.intermediate_size if spec else 0,
        renormalize=spec.renormalize if spec else False,
    )


def _layer(layer: torch.nn.Module, kv_cache: torch.Tensor) -> StackLayer:
    assert isinstance(layer, LlamaDecoderLayer)
    attention, mlp = layer.self_attn, layer.mlp
    dense = mlp if isinstance(mlp, LlamaMLP) else None
    return StackLayer(
        input_norm=_float32(layer.input_layernorm.weight),
        post_norm=_float32(layer.post_attention_layernorm.weight),
        qkv=store(attention.qkv_proj).finish(),
        o=store(attention.o_proj).finish(),
        gate_up=store(dense.gate_up_proj).finish() if dense else None,
        down=store(dense.down_proj).finish() if dense else None,
        qkv_bias=_optional(attention.qkv_proj.bias),
        o_bias=_optional(attention.o_proj.bias),
        gate_up_bias=_optional(dense.gate_up_proj.bias) if dense else None,
        down_bias=_optional(dense.down_proj.bias) if dense else None,
        kv_cache=kv_cache,
        q_norm=_norm_weight(attention.q_norm),
        k_norm=_norm_weight(attention.k_norm),
        experts=_experts(mlp) if isinstance(mlp, SparseMoeBlock) else None,
    )


def _experts(block: SparseMoeBlock) -> StackExperts:
    experts = block.experts.quantized
    assert experts is not None
    return StackExperts(
        router=_float32(block.gate.weight),
        gate_up=tuple(store.finish_whole() for store in experts.gate_up),
        down=tuple(store.finish_whole() for store in experts.down),
    )


def _norm_weight(norm: torch.nn.Module | None) -> torch.Tensor | None:
    if norm is None:
        return None
    assert isinstance(norm, RMSNorm)
    return _float32(norm.weight)


def _plain_head_norms(attention: torch.nn.Module, eps: float) -> bool:
    """Qwen3's q/k norms: RMSNorm (weight * x / rms, not Gemma's 1 + weight) at the layers' epsilon."""
    norms = (getattr(attention, "q_norm", None), getattr(attention, "k_norm", None))
    return all(type(norm) is RMSNorm and norm.eps == eps for norm in norms)


def _head(model: LlamaForCausalLM) -> PackedWeight | None:
    """The LM head's packed weight where it runs on the quantized kernels (the fused call then computes
    the logits too), else None."""
    head = model.lm_head
    plain_logits = type(model).compute_logits is LlamaForCausalLM.compute_logits  # no soft-cap or scaling
    if not plain_logits or head.method is not CPU_QUANTIZED or not head.tp.is_single:
        return None
    return store(head).finish()


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).contiguous()


def _optional(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else _float32(tensor)
