"""Qwen3 decoder (dense): Llama-style blocks plus a per-head RMSNorm on queries and keys before RoPE."""

from __future__ import annotations

from typing import Any

from batchlm.models.llama import BlockOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: q_norm / k_norm per head, no MLP bias; the LM head tied in the small checkpoints."""

    @classmethod
    def block_options(cls, config: Any) -> BlockOptions:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return BlockOptions(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True)
