"""The CPU runner's fused decode path: steps that only decode, for up to MAX_ROWS requests, of a Llama-style,
Gemma, GLM-4 or gpt-oss model whose linears all run on the quantized CPU kernels (a mixture-of-experts
model's experts included) go through one C call for the whole stack (kernels/cpu_decode_stack.py) instead of the
model's forward. Every other step, model or device keeps the generic path; for such a model that path
takes the stack's own norms and gated activations (kernels/cpu_row_ops.py).

At one or a few requests a decode step of a small model is mostly per-layer overhead between the
matmuls (BENCHMARKS.md, "CPU: quantized GGUF models against llama-server"); the more rows, the more the
matmuls dominate, and past MAX_ROWS the fused call's gain was not measured.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

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
from batchlm.kernels.cpu_moe import ExpertActivation
from batchlm.kernels.cpu_row_ops import StackRowOps
from batchlm.kernels.quant_panels import PackedWeight
from batchlm.layers.activation import GeluTanhAndMul, SiluAndMul
from batchlm.layers.moe import MoESpec, SparseMoeBlock
from batchlm.layers.norm import Float32WeightRMSNorm, RMSNorm
from batchlm.layers.quantization.cpu_quantized import CpuQuantizedLinearMethod, store
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.models.gemma import Gemma2ForCausalLM, GemmaDecoderLayer, GemmaModel, GemmaRMSNorm
from batchlm.models.glm4 import Glm4DecoderLayer
from batchlm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from batchlm.runner.inputs import StepInputs

logger = logging.getLogger(__name__)

DISABLE_ENV = "BATCHLM_CPU_FUSED_DECODE"  # 0/false/off/no: always the generic path (A/B runs)
MAX_ROWS = 32  # decode steps of at most this many requests take the fused path
# Verify steps laid out as decode rows (runner/decode_rows.py) of at most this many rows take it too:
# as many as plain decodes, so auto's largest CPU step (4 requests of 1 + 7 rows) does. A verify step
# left to the generic forward would round differently from the plain decodes it stands for, and
# speculation would no longer give their very logprobs (and near-tie tokens).
MAX_VERIFY_ROWS = MAX_ROWS


class FusedDecode:
    """Runs eligible steps through a DecodeStack; `can_run` says which."""

    def __init__(self, model: LlamaForCausalLM | Gemma2ForCausalLM, stack: DecodeStack) -> None:
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
        hidden = self.model.model.embed(inputs.input_ids).float().contiguous()
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

    def share_row_ops(self) -> None:
        """The model's RMS norms (not Gemma's, which scale by 1 + weight) and gated activations compute
        as the stack computes them in the steps it does not take too (prompts, bigger batches)."""
        ops = StackRowOps(self.stack.library)
        for module in self.model.modules():
            if isinstance(module, (RMSNorm, SiluAndMul, GeluTanhAndMul)):
                module.row_ops = ops


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
    assert isinstance(model, (LlamaForCausalLM, Gemma2ForCausalLM))
    shape = _shape(model, kv_caches[0])
    reason = fits(shape, kv_caches)
    if reason is not None:
        logger.info("CPU decode: layer by layer (%s)", reason)
        return None
    unrotated: dict[torch.Size, torch.Tensor] = {}
    layers = [
        _layer(layer, cache, unrotated) for layer, cache in zip(model.model.layers, kv_caches, strict=True)
    ]
    logger.info("CPU decode: steps of up to %d requests run the whole stack in one fused call", MAX_ROWS)
    return FusedDecode(model, DecodeStack(shape, layers, _head(model)))


def _unsupported(model: torch.nn.Module, kv_caches: list[torch.Tensor], attn: AttentionBackend) -> str | None:
    if not isinstance(model, (LlamaForCausalLM, Gemma2ForCausalLM)) or not isinstance(
        attn, TorchAttentionBackend
    ):
        return "not a Llama- or Gemma-style model on the CPU attention backend"
    if (reason := _other_blocks(model)) is not None:
        return reason
    if (reason := _unsupported_norm(model.model.norm)) is not None:
        return f"final norm: {reason}"
    moe_specs: set[MoESpec] = set()
    rotary_dims: set[int] = set()
    epsilons = {_epsilon(model.model.norm)}
    for layer in model.model.layers:
        assert isinstance(layer, (LlamaDecoderLayer, GemmaDecoderLayer))
        attention, mlp = layer.self_attn, layer.mlp
        if isinstance(mlp, SparseMoeBlock):
            if (reason := _unsupported_experts(mlp)) is not None:
                return reason
            moe_specs.add(mlp.spec)
        elif not isinstance(mlp, LlamaMLP):
            return "an MLP other than the dense or mixture-of-experts one"
        if len(moe_specs) > 1:
            return "mixture-of-experts layers of different shapes"
        rotary_dims.add(attention.rotary_emb.rotary_dim)
        linears = [attention.qkv_proj, attention.o_proj]
        if isinstance(mlp, LlamaMLP):
            linears += [mlp.gate_up_proj, mlp.down_proj]
            if not isinstance(mlp.act_fn, (SiluAndMul, GeluTanhAndMul)):
                return "an activation other than SiLU or GELU (tanh)"
        if not all(
            isinstance(m, MethodLayer) and isinstance(m.method, CpuQuantizedLinearMethod) for m in linears
        ):
            return "not every linear runs on the quantized CPU kernels"
        norms = [*_block_norms(layer), attention.q_norm, attention.k_norm]
        for norm in norms:
            if norm is not None and (reason := _unsupported_norm(norm)) is not None:
                return reason
        epsilons |= {_epsilon(norm) for norm in norms if norm is not None}
        if not attention.qkv_proj.tp.is_single:
            return "tensor parallel"
    if len(epsilons) > 1:
        return "norms of different epsilons"
    if len(rotary_dims) > 1:
        return "layers rotating different numbers of dimensions"
    activations = {type(layer.mlp.act_fn) for layer in model.model.layers if isinstance(layer.mlp, LlamaMLP)}
    if len(activations) > 1:
        return "dense MLPs of different activations"
    return None


def _other_blocks(model: LlamaForCausalLM | Gemma2ForCausalLM) -> str | None:
    """Why the stack cannot stand for the model's decoder, or None. The stack computes Llama's,
    Gemma's and GLM-4's decoder stacks, blocks and attention as they are (GLM-4's: Gemma's four norms,
    plain RMS ones; gpt-oss's: Llama's, with sinks): a family that subclasses them to compute otherwise
    (Granite's scaled residuals, Ministral 3's queries scaled by position) keeps the model's own
    forward."""
    if type(model.model) not in (LlamaModel, GemmaModel):
        return f"a decoder stack the fused call does not compute ({type(model.model).__name__})"
    for layer in model.model.layers:
        if type(layer) not in (LlamaDecoderLayer, GemmaDecoderLayer, Glm4DecoderLayer):
            return f"decoder layers the fused call does not compute ({type(layer).__name__})"
        if type(layer.self_attn) is not LlamaAttention:
            return f"attention the fused call does not compute ({type(layer.self_attn).__name__})"
    return None


def _unsupported_experts(block: SparseMoeBlock) -> str | None:
    """Why the stack cannot run the block's experts, or None: it runs them where the experts kernel
    does (quantized, SiLU or clamped SwiGLU, with gpt-oss's biases or without)."""
    experts = block.experts.quantized
    if experts is None or experts.kernel is None:
        return "mixture-of-experts layers whose experts are not quantized experts on the CPU kernels"
    return None


def _block_norms(layer: LlamaDecoderLayer | GemmaDecoderLayer) -> tuple[nn.Module, ...]:
    """The layer's norms in the stack's order: before the attention, before the MLP and (Gemma, GLM-4)
    of the attention's and the MLP's outputs."""
    if isinstance(layer, Glm4DecoderLayer):
        return (
            layer.input_layernorm,
            layer.post_attention_layernorm,
            layer.post_self_attn_layernorm,
            layer.post_mlp_layernorm,
        )
    if isinstance(layer, GemmaDecoderLayer):
        return (
            layer.input_layernorm,
            layer.pre_feedforward_layernorm,
            layer.post_attention_layernorm,
            layer.post_feedforward_layernorm,
        )
    return layer.input_layernorm, layer.post_attention_layernorm


def _unsupported_norm(norm: nn.Module) -> str | None:
    if type(norm) is Float32WeightRMSNorm and norm.weight.dtype != torch.float32:
        return f"gpt-oss's norms in {norm.weight.dtype}, which round otherwise than the stack's float32 ones"
    return None if _is_rms_norm(norm) else "a norm other than RMSNorm"


def _is_rms_norm(norm: nn.Module) -> bool:
    """A norm the stack computes: RMSNorm, Gemma's with its 1 + weight (subclasses may differ), and
    gpt-oss's Float32WeightRMSNorm where its weight is float32 (a float32 model, the CPU's default):
    there it is RMSNorm; in bfloat16 it rounds otherwise."""
    if type(norm) is Float32WeightRMSNorm:
        return norm.weight.dtype == torch.float32
    return type(norm) in (RMSNorm, GemmaRMSNorm)


def _factor(norm: nn.Module | None) -> torch.Tensor | None:
    """What a norm _is_rms_norm accepts multiplies the normed values by (float32): its weight, or
    Gemma's 1 + weight."""
    if norm is None:
        return None
    assert isinstance(norm, (RMSNorm, GemmaRMSNorm)) and _is_rms_norm(norm)
    weight = _float32(norm.weight)
    return (1.0 + weight).contiguous() if isinstance(norm, GemmaRMSNorm) else weight


def _epsilon(norm: nn.Module) -> float:
    assert isinstance(norm, (RMSNorm, GemmaRMSNorm))
    return float(norm.eps)


def _shape(model: LlamaForCausalLM | Gemma2ForCausalLM, kv_cache: torch.Tensor) -> StackShape:
    layers = model.model.layers
    first = layers[0]
    assert isinstance(first, (LlamaDecoderLayer, GemmaDecoderLayer))
    attention = first.self_attn
    dense = [layer.mlp for layer in layers if isinstance(layer.mlp, LlamaMLP)]
    sparse = [layer.mlp for layer in layers if isinstance(layer.mlp, SparseMoeBlock)]
    spec = sparse[0].spec if sparse else None
    activation = _expert_activation(sparse[0]) if sparse else ExpertActivation()
    final_norm = _factor(model.model.norm)
    assert final_norm is not None
    return StackShape(
        hidden=final_norm.shape[0],
        heads=attention.num_heads,
        kv_heads=attention.num_kv_heads,
        head_dim=attention.head_dim,
        intermediate=dense[0].down_proj.input_size_per_rank if dense else 0,
        block_size=kv_cache.shape[2],
        eps=_epsilon(model.model.norm),
        scale=float(attention.spec.scale),
        final_norm=final_norm,
        experts=spec.num_experts if spec else 0,
        top_k=spec.top_k if spec else 0,
        expert_inter=spec.intermediate_size if spec else 0,
        renormalize=spec.renormalize if spec else False,
        gelu=bool(dense) and isinstance(dense[0].act_fn, GeluTanhAndMul),
        rotary_dim=attention.rotary_emb.rotary_dim,
        expert_activation=activation.kind,
        swiglu_alpha=activation.alpha,
        swiglu_limit=activation.limit,
    )


def _expert_activation(block: SparseMoeBlock) -> ExpertActivation:
    """The activation the experts kernel computes for the block (every sparse layer's: one MoESpec)."""
    experts = block.experts.quantized
    assert experts is not None and experts.kernel is not None
    return experts.kernel.activation


def _layer(
    layer: torch.nn.Module, kv_cache: torch.Tensor, unrotated: dict[torch.Size, torch.Tensor]
) -> StackLayer:
    assert isinstance(layer, (LlamaDecoderLayer, GemmaDecoderLayer))
    attention, mlp = layer.self_attn, layer.mlp
    dense = mlp if isinstance(mlp, LlamaMLP) else None
    before_attention, before_mlp, *after = map(_factor, _block_norms(layer))
    assert before_attention is not None and before_mlp is not None
    return StackLayer(
        input_norm=before_attention,
        post_norm=before_mlp,
        cos_sin=_rotation_table(attention, unrotated),
        qkv=store(attention.qkv_proj).finish(),
        o=store(attention.o_proj).finish(),
        gate_up=store(dense.gate_up_proj).finish() if dense else None,
        down=store(dense.down_proj).finish() if dense else None,
        qkv_bias=_optional(attention.qkv_proj.bias),
        o_bias=_optional(attention.o_proj.bias),
        gate_up_bias=_optional(dense.gate_up_proj.bias) if dense else None,
        down_bias=_optional(dense.down_proj.bias) if dense else None,
        kv_cache=kv_cache,
        q_norm=_factor(attention.q_norm),
        k_norm=_factor(attention.k_norm),
        experts=_experts(mlp) if isinstance(mlp, SparseMoeBlock) else None,
        attn_out_norm=after[0] if after else None,
        mlp_out_norm=after[1] if after else None,
        window=attention.spec.sliding_window or 0,
        softcap=attention.spec.logit_softcap or 0.0,
        sinks=_optional(attention.sinks),
    )


def _rotation_table(attention: LlamaAttention, unrotated: dict[torch.Size, torch.Tensor]) -> torch.Tensor:
    """The layer's cos | sin table (float32); a layer without RoPE gets the table of no rotation (cos 1,
    sin 0: the stack's rotation gives back every query and key exactly), one shared by such layers."""
    table = attention.rotary_emb.cos_sin_cache
    if attention.rotates:
        return _float32(table)
    if table.shape not in unrotated:
        rows, half = table.shape[0], table.shape[-1] // 2
        cos, sin = torch.ones(rows, half, dtype=torch.float32), torch.zeros(rows, half, dtype=torch.float32)
        unrotated[table.shape] = torch.cat((cos, sin), dim=-1)
    return unrotated[table.shape]


def _experts(block: SparseMoeBlock) -> StackExperts:
    experts = block.experts.quantized
    assert experts is not None
    gate_up_bias = _optional(block.experts.gate_up_proj_bias)
    return StackExperts(
        router=_float32(block.gate.weight),
        gate_up=tuple(store.finish_whole() for store in experts.gate_up),
        down=tuple(store.finish_whole() for store in experts.down),
        router_bias=_optional(block.gate.bias),
        gate_up_bias=None if gate_up_bias is None else tuple(gate_up_bias.unbind(0)),
        down_bias=_optional(block.experts.down_proj_bias),
    )


def _head(model: LlamaForCausalLM | Gemma2ForCausalLM) -> PackedWeight | None:
    """The LM head's packed weight where it runs on the quantized kernels (the fused call then computes
    the logits too), else None."""
    head = model.lm_head
    if isinstance(model, Gemma2ForCausalLM):
        plain_logits = model.config.final_logit_softcap is None
    else:
        plain_logits = type(model).compute_logits is LlamaForCausalLM.compute_logits  # no scaling
    if not plain_logits or not isinstance(head.method, CpuQuantizedLinearMethod) or not head.tp.is_single:
        return None
    return store(head).finish()


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).contiguous()


def _optional(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else _float32(tensor)
