"""OLMo 2 decoders (Olmo2ForCausalLM).

What sets them apart from Llama: no norm before the attention or the MLP; each block norms the
attention's and the MLP's outputs before the residual add; queries and keys are RMS-normed over the
whole q and k projections (all heads together, not per head) before RoPE; and every RMSNorm multiplies
by its weight in float32, before the cast back to the activations' dtype (Llama's after it).
"""

from __future__ import annotations

import torch
from torch import nn

from batchlm.layers.linear import check_shape
from batchlm.layers.norm import RMSNorm
from batchlm.layers.quantization.base import LoadedWeight, as_dense
from batchlm.layers.rotary import RotaryEmbedding
from batchlm.models.llama import BlockOptions, LlamaAttention
from batchlm.models.model_config import LayerSpec, ModelConfig
from batchlm.models.post_norm import PostNormForCausalLM
from batchlm.parallel.group import TensorParallelGroup


class Olmo2RMSNorm(RMSNorm):
    """y = (weight * x / sqrt(mean(x^2) + eps)) computed in float32, then cast back (transformers'
    Olmo2RMSNorm). No fused residual form: OLMo 2 adds the residual after the norm. (An RMSNorm, so
    that random-weight loads start it at ones as they do Llama's; the forward is its own.)"""

    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor:  # type: ignore[override]
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same bits as the form below in float32, in one kernel.
            return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


class ProjectionRMSNorm(Olmo2RMSNorm):
    """OLMo 2's norm over a whole q or k projection, whose heads tensor parallelism shares out among
    ranks: each rank holds its heads' slice of the weight, and the mean square sums every rank's part
    (a KV head held by `replicas` ranks is counted once)."""

    def __init__(
        self, full_width: int, start: int, width: int, replicas: int, eps: float, tp: TensorParallelGroup
    ) -> None:
        super().__init__(width, eps)
        self.full_width, self.start, self.replicas, self.tp = full_width, start, replicas, tp

    def load_weight(
        self, name: str, param_name: str, loaded: LoadedWeight, shard: str | int | None = None
    ) -> None:
        """This rank's slice of the checkpoint's whole-projection weight."""
        check_shape(name, (self.full_width,), loaded.shape)
        part = as_dense(loaded, self.weight.dtype).narrow(0, self.start, self.weight.shape[0])
        with torch.no_grad():
            self.weight.copy_(part)

    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor:  # type: ignore[override]
        if self.tp.is_single:
            return super().forward(x)
        x32 = x.float()
        squares = self.tp.all_reduce(x32.pow(2).sum(dim=-1, keepdim=True)) / self.replicas
        normed = x32 * torch.rsqrt(squares / self.full_width + self.eps)
        return (self.weight.float() * normed).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} of {self.full_width} from {self.start}, eps={self.eps}"


class Olmo2Attention(LlamaAttention):
    """Llama's attention with q and k normed over their whole projections before RoPE."""

    def __init__(
        self, config: ModelConfig, layer: LayerSpec, rope: RotaryEmbedding, tp: TensorParallelGroup
    ) -> None:
        options = BlockOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias)
        super().__init__(config, layer, rope, options, tp)
        qkv, eps = self.qkv_proj, config.rms_norm_eps
        d = self.head_dim
        kv_replicas = max(1, tp.size // qkv.total_num_kv_heads)
        self.q_norm = ProjectionRMSNorm(qkv.total_num_heads * d, tp.rank * qkv.q_size, qkv.q_size, 1, eps, tp)
        self.k_norm = ProjectionRMSNorm(
            qkv.total_num_kv_heads * d, qkv.kv_head_start * d, qkv.kv_size, kv_replicas, eps, tp
        )

    def query_key_heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.q_norm is not None and self.k_norm is not None
        q = self.q_norm(q).view(-1, self.num_heads, self.head_dim)
        k = self.k_norm(k).view(-1, self.num_kv_heads, self.head_dim)
        return q, k


class Olmo2ForCausalLM(PostNormForCausalLM):
    """OLMo 2 (OLMo-2-1124-7B/13B, OLMo-2-0325-32B, OLMo-2-0425-1B and their instruct models)."""

    @staticmethod
    def build_attention(
        config: ModelConfig, layer: LayerSpec, rope: RotaryEmbedding, tp: TensorParallelGroup
    ) -> nn.Module:
        return Olmo2Attention(config, layer, rope, tp)

    @staticmethod
    def build_norm(width: int, eps: float) -> nn.Module:
        return Olmo2RMSNorm(width, eps)
