"""Qwen3 decoder (dense): Llama-style blocks plus a per-head RMSNorm on queries and keys before RoPE."""

from __future__ import annotations

from batchlm.models.llama import BlockOptions, LlamaForCausalLM
from batchlm.models.model_config import ModelConfig


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: q_norm / k_norm per head, no MLP bias; the LM head tied in the small checkpoints."""

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        return BlockOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True)
