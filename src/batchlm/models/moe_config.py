"""The mixture-of-experts fields of a Qwen3-MoE, Mixtral or gpt-oss config, read once into a typed record."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from batchlm.layers.activation import CLAMPED_SWIGLU
from batchlm.layers.moe import MoESpec
from batchlm.models.hf_config import field_of
from batchlm.models.model_config import ModelConfig


@dataclass(frozen=True)
class MoEConfig:
    """Which decoder layers are sparse, and the shape and routing of their experts."""

    num_experts: int
    top_k: int
    # Each expert's intermediate size.
    expert_intermediate_size: int
    renormalize: bool
    # One flag per decoder layer: True where the MLP is a sparse expert block.
    sparse_layers: tuple[bool, ...]
    hidden_act: str = "silu"
    # As MoESpec's: the activation's options, a router bias, the experts' biases.
    act_options: tuple[tuple[str, float], ...] = ()
    router_bias: bool = False
    expert_bias: bool = False

    def spec(self, hidden_size: int) -> MoESpec:
        return MoESpec(
            self.num_experts,
            self.top_k,
            hidden_size,
            self.expert_intermediate_size,
            self.renormalize,
            self.hidden_act,
            self.act_options,
            self.router_bias,
            self.expert_bias,
        )


@dataclass(frozen=True)
class MoEModelConfig(ModelConfig):
    """A ModelConfig with the expert fields of its family."""

    moe: MoEConfig = field(kw_only=True)


def with_moe(base: ModelConfig, moe: MoEConfig) -> MoEModelConfig:
    return MoEModelConfig(**{f.name: getattr(base, f.name) for f in fields(base)}, moe=moe)


def _num_experts(config: Any) -> int:
    # Qwen3-MoE checkpoints say num_experts; newer transformers writes num_local_experts.
    return int(field_of(config, "num_experts") or field_of(config, "num_local_experts", 0))


def _check(config: MoEConfig) -> MoEConfig:
    if any(config.sparse_layers) and not 0 < config.top_k <= config.num_experts:
        raise ValueError(
            f"num_experts_per_tok ({config.top_k}) must be between 1 and the number of experts "
            f"({config.num_experts})"
        )
    return config


def read_qwen3_moe(config: Any) -> MoEConfig:
    """Qwen3-MoE: a layer is sparse unless listed in mlp_only_layers, and then only every
    decoder_sparse_step-th layer; norm_topk_prob rescales the kept routing weights."""
    num_experts = _num_experts(config)
    step = int(field_of(config, "decoder_sparse_step", 1))
    dense_only = {int(i) for i in field_of(config, "mlp_only_layers", [])}
    layers = int(field_of(config, "num_hidden_layers"))
    sparse = tuple(
        i not in dense_only and num_experts > 0 and step > 0 and (i + 1) % step == 0 for i in range(layers)
    )
    return _check(
        MoEConfig(
            num_experts=num_experts,
            top_k=int(field_of(config, "num_experts_per_tok")),
            expert_intermediate_size=int(field_of(config, "moe_intermediate_size")),
            renormalize=bool(field_of(config, "norm_topk_prob", False)),
            sparse_layers=sparse,
            hidden_act=str(field_of(config, "hidden_act", "silu")),
        )
    )


def read_mixtral(config: Any) -> MoEConfig:
    """Mixtral: every layer is sparse, experts have the config's intermediate_size, and the kept
    routing weights always sum to 1."""
    return _check(
        MoEConfig(
            num_experts=_num_experts(config),
            top_k=int(field_of(config, "num_experts_per_tok")),
            expert_intermediate_size=int(field_of(config, "intermediate_size")),
            renormalize=True,
            sparse_layers=(True,) * int(field_of(config, "num_hidden_layers")),
            hidden_act=str(field_of(config, "hidden_act", "silu")),
        )
    )


def read_gpt_oss(config: Any) -> MoEConfig:
    """gpt-oss: every layer is sparse; the router (with a bias) keeps the top_k logits and softmaxes
    them, which is a softmax over all experts renormalized over the kept ones; the experts (with
    biases) apply the clamped SwiGLU with the config's swiglu_alpha and swiglu_limit (its hidden_act
    says "silu", which its experts do not compute)."""
    return _check(
        MoEConfig(
            num_experts=_num_experts(config),
            top_k=int(field_of(config, "num_experts_per_tok")),
            expert_intermediate_size=int(field_of(config, "intermediate_size")),
            renormalize=True,
            sparse_layers=(True,) * int(field_of(config, "num_hidden_layers")),
            hidden_act=CLAMPED_SWIGLU,
            act_options=(
                ("alpha", float(field_of(config, "swiglu_alpha", 1.702))),
                ("limit", float(field_of(config, "swiglu_limit", 7.0))),
            ),
            router_bias=True,
            expert_bias=True,
        )
    )
