"""The mixture-of-experts fields of a Qwen3-MoE or Mixtral config, read once into a typed record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchlm.layers.moe import MoESpec


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

    def spec(self, hidden_size: int) -> MoESpec:
        return MoESpec(
            self.num_experts,
            self.top_k,
            hidden_size,
            self.expert_intermediate_size,
            self.renormalize,
            self.hidden_act,
        )


def _field(config: Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    return default if value is None else value


def _num_experts(config: Any) -> int:
    # Qwen3-MoE checkpoints say num_experts; newer transformers writes num_local_experts.
    return int(_field(config, "num_experts") or _field(config, "num_local_experts", 0))


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
    step = int(_field(config, "decoder_sparse_step", 1))
    dense_only = {int(i) for i in _field(config, "mlp_only_layers", [])}
    layers = int(_field(config, "num_hidden_layers"))
    sparse = tuple(
        i not in dense_only and num_experts > 0 and step > 0 and (i + 1) % step == 0 for i in range(layers)
    )
    return _check(
        MoEConfig(
            num_experts=num_experts,
            top_k=int(_field(config, "num_experts_per_tok")),
            expert_intermediate_size=int(_field(config, "moe_intermediate_size")),
            renormalize=bool(_field(config, "norm_topk_prob", False)),
            sparse_layers=sparse,
            hidden_act=str(_field(config, "hidden_act", "silu")),
        )
    )


def read_mixtral(config: Any) -> MoEConfig:
    """Mixtral: every layer is sparse, experts have the config's intermediate_size, and the kept
    routing weights always sum to 1."""
    return _check(
        MoEConfig(
            num_experts=_num_experts(config),
            top_k=int(_field(config, "num_experts_per_tok")),
            expert_intermediate_size=int(_field(config, "intermediate_size")),
            renormalize=True,
            sparse_layers=(True,) * int(_field(config, "num_hidden_layers")),
            hidden_act=str(_field(config, "hidden_act", "silu")),
        )
    )
