"""Load a model for the MLX backend through mlx-lm: local dirs, hub ids, quantized checkpoints, adapters."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchlm.backends.mlx.config_names import older_field_names
from batchlm.backends.mlx.families import (
    apply_sliding_window,
    group_attention_masks,
    mlx_lm_overrides,
    window_context_cap,
)
from batchlm.backends.mlx.gpt_oss import model_classes
from batchlm.config import EngineConfig

logger = logging.getLogger(__name__)

# Used when neither the config nor the model states a context limit.
FALLBACK_MAX_MODEL_LEN = 4096
# EngineConfig.dtype values the MLX backend can cast to (mlx dtype attribute names).
MLX_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for mlx-lm's BatchGenerator, and the facts the front end needs about it."""

    # The mlx-lm model (an mlx.nn.Module).
    model: Any
    # Local directory holding config.json, the weights and (usually) the tokenizer files.
    model_dir: Path
    max_model_len: int
    vocab_size: int
    # True when the checkpoint holds quantized weights (e.g. mlx-community 4-bit models).
    quantized: bool


def check_config(config: EngineConfig) -> None:
    """Reject settings the MLX backend cannot honour, naming the setting (before any loading)."""
    if config.tensor_parallel_size != 1:
        raise ValueError(
            f"the mlx backend runs on one device: tensor_parallel_size must be 1, got {config.tensor_parallel_size}"
        )
    if config.device not in ("auto", "cpu", "gpu"):
        raise ValueError(
            f"the mlx backend supports device 'auto', 'cpu' or 'gpu' (Metal), got {config.device!r}"
        )
    if config.dtype != "auto" and config.dtype not in MLX_DTYPES:
        raise ValueError(
            f"the mlx backend supports dtype 'auto' or one of {sorted(MLX_DTYPES)}, got {config.dtype!r}"
        )
    if config.load_format != "auto":
        raise ValueError(
            f"the mlx backend loads safetensors checkpoints only: load_format must be 'auto', got {config.load_format!r}"
        )
    if config.kv_cache_dtype != "auto":
        raise ValueError(
            f"the mlx backend keeps mlx-lm's KV cache in the model's dtype: kv_cache_dtype must be 'auto', got "
            f"{config.kv_cache_dtype!r}"
        )
    if config.quantization is not None:
        raise ValueError(
            f"the mlx backend serves a checkpoint's weights as they are (mlx-community's quantized ones "
            f"included): quantization must be unset, got {config.quantization!r}"
        )


# Settings of the torch engine that the mlx backend has no use for (mlx-lm keeps its own cache and
# samples with its own random state, and there is no speculation here), at their defaults.
_TORCH_ONLY_DEFAULTS: dict[str, object] = {
    "block_size": 16,
    "gpu_memory_utilization": 0.90,
    "num_gpu_blocks_override": None,
    "enforce_eager": False,
    "seed": 0,
    "async_scheduling": "auto",
    "num_speculative_tokens": None,
    "speculative_max_batch": None,
    "speculative_pool_tokens": None,
}


def ignored_settings(config: EngineConfig) -> list[str]:
    """The torch engine's settings given other values than their defaults, which this backend ignores
    (`speculative` only when asked for: "auto" and "off" both mean none here)."""
    ignored = [name for name, default in _TORCH_ONLY_DEFAULTS.items() if getattr(config, name) != default]
    if config.speculative not in ("auto", "off"):
        ignored.append("speculative")
    return ignored


def warn_ignored_settings(config: EngineConfig) -> None:
    ignored = ignored_settings(config)
    if ignored:
        logger.warning(
            "the mlx backend ignores these settings of the torch engine: %s",
            ", ".join(f"{name}={getattr(config, name)!r}" for name in ignored),
        )


def resolve_model_dir(config: EngineConfig) -> Path:
    """The model's local directory: a local path or a hub download; the built-in default is a GGUF
    file, which mlx-lm does not load, so this backend serves the random demo model in its place."""
    from batchlm.models.gguf_model_dir import find_gguf_file
    from batchlm.models.model_source import prepare_model_dir

    if config.built_in_model:
        from batchlm.models.demo import ensure_demo_model

        logger.warning(
            "the mlx backend does not load GGUF files, so not the default model; use --backend torch"
        )
        return ensure_demo_model()
    if find_gguf_file(Path(config.model).expanduser()) is not None:
        raise ValueError(f"the mlx backend does not load GGUF files ({config.model}); use --backend torch")
    return prepare_model_dir(config)


def load_model(config: EngineConfig, model_dir: Path) -> LoadedModel:
    """Load weights (quantized or not) with mlx-lm, apply the adapter and dtype; call on the thread
    that will run the model (mlx streams belong to a thread)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_load_model

    check_config(config)
    if config.device == "cpu":
        mx.set_default_device(mx.cpu)
    overrides = {**family_overrides(model_dir), **older_field_names(model_dir), **config.hf_overrides} or None
    model, model_config = mlx_load_model(
        model_dir,
        model_config=overrides,
        get_model_classes=model_classes,
        trust_remote_code=config.trust_remote_code,
    )
    if config.adapter_path is not None:
        model = apply_adapter(model, config.adapter_path)
    warn_long_factors_throughout(model_config)
    apply_sliding_window(model, model_config)
    group_attention_masks(model, model_config)
    if config.dtype != "auto":
        cast_floating_weights(model, config.dtype)
    mx.eval(model.parameters())
    return LoadedModel(
        model=model,
        model_dir=model_dir,
        max_model_len=resolve_max_model_len(config, model_config),
        vocab_size=model_vocab_size(model_config),
        quantized="quantization" in model_config,
    )


def apply_adapter(model: Any, adapter_path: str) -> Any:
    """Attach an mlx-lm adapter (adapters.safetensors + adapter_config.json, as `mlx_lm.lora` writes)."""
    from mlx_lm.utils import load_adapters

    path = Path(adapter_path).expanduser()
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"adapter path {adapter_path!r} has no adapter_config.json")
    adapter_config = json.loads(config_file.read_text())
    if "peft_type" in adapter_config or not (path / "adapters.safetensors").is_file():
        raise ValueError(
            f"adapter {adapter_path!r} is not in mlx-lm's format (adapters.safetensors + adapter_config.json "
            "with lora_parameters); the mlx backend cannot load PEFT adapters: use the torch backend, or "
            "convert the adapter with mlx_lm"
        )
    model = load_adapters(model, str(path))
    model.eval()
    return model


def warn_long_factors_throughout(model_config: dict[str, Any]) -> None:
    """mlx-lm's LongRoPE (SuScaledRoPE: Phi-3, Phi-3.5, Phi-4-mini) rotates every position with the long
    factors whatever the sequence's length; transformers and the torch backend rotate a sequence of up
    to original_max_position_embeddings tokens with the short ones. mlx-lm's behaviour is kept: named."""
    text = _text_config(model_config)
    scaling = text.get("rope_scaling")
    if not isinstance(scaling, dict):
        return
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind not in ("longrope", "su") or scaling.get("short_factor") == scaling.get("long_factor"):
        return
    original = text.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    logger.warning(
        "mlx-lm rotates every position with LongRoPE's long factors: sequences of up to %s tokens "
        "(original_max_position_embeddings), which transformers rotates with the short factors, get "
        "other logits than transformers' and --backend torch's",
        original,
    )


def cast_floating_weights(model: Any, dtype_name: str) -> None:
    """Cast floating-point parameters to `dtype_name`; quantized (integer) weights stay packed."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    dtype = getattr(mx, MLX_DTYPES[dtype_name])
    keep = getattr(model, "cast_predicate", lambda _path: True)

    def cast(path: str, value: Any) -> Any:
        if keep(path) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(dtype)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))


def _text_config(model_config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal checkpoints nest the language model's settings.
    nested = model_config.get("text_config")
    return nested if isinstance(nested, dict) else model_config


def family_overrides(model_dir: Path) -> dict[str, Any]:
    """config.json fields mlx-lm reads under other names than transformers 5 writes (families.py)."""
    path = model_dir / "config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    return mlx_lm_overrides(raw) if isinstance(raw, dict) else {}


def resolve_max_model_len(config: EngineConfig, model_config: dict[str, Any]) -> int:
    """The configured limit (ValueError above the model's), else the model's RoPE-scaled
    max_position_embeddings, else a stated fallback; within a sliding window that is not applied for
    the model (families.window_context_cap)."""
    limit = _configured_or_stated_limit(config, model_config)
    cap = window_context_cap(model_config)
    if cap is not None and limit > cap:
        logger.warning(
            "the mlx backend does not apply %s's %d-token sliding window: "
            "max_model_len is capped at %d (--backend torch serves the full context)",
            model_config.get("model_type"),
            cap,
            cap,
        )
        return cap
    return limit


def _configured_or_stated_limit(config: EngineConfig, model_config: dict[str, Any]) -> int:
    model_limit = model_context_length(model_config)
    if config.max_model_len is not None:
        if model_limit is not None and config.max_model_len > model_limit:
            raise ValueError(
                f"--max-model-len {config.max_model_len} exceeds the model's context length {model_limit} "
                "(from its config)"
            )
        return config.max_model_len
    if model_limit is None:
        logger.warning(
            "the model states no max_position_embeddings: using max_model_len %d", FALLBACK_MAX_MODEL_LEN
        )
        return FALLBACK_MAX_MODEL_LEN
    return model_limit


# Model types whose max_position_embeddings is the RoPE-scaled context already.
STATES_SCALED_LENGTH = frozenset({"gemma3", "gemma3_text"})


def model_context_length(model_config: dict[str, Any]) -> int | None:
    """The RoPE-scaled position limit, as the torch backend computes it (models/hf_config.context_length,
    layers/rope_scaling.scaled_max_position, which import torch): linear and dynamic scaling stretch
    max_position_embeddings by `factor`, YaRN its original length; llama3 and longrope configs state
    theirs. None when the config states no max_position_embeddings. Gemma 3 states its scaled length
    already: transformers reads its scaling as the global layers' alone (vLLM skips it too)."""
    text = _text_config(model_config)
    stated = text.get("max_position_embeddings") or model_config.get("max_position_embeddings")
    if stated is None:
        return None
    limit = int(stated)
    if text.get("model_type", model_config.get("model_type")) in STATES_SCALED_LENGTH:
        return limit
    # transformers takes rope_scaling over rope_parameters when a config states both.
    scaling = text.get("rope_scaling") or text.get("rope_parameters")
    if not isinstance(scaling, dict) or any(isinstance(value, dict) for value in scaling.values()):
        return limit  # plain RoPE, or per-layer-type parameters, which state the scaled length already
    rope_type = scaling.get("rope_type") or scaling.get("type")
    factor = scaling.get("factor")
    if rope_type in ("linear", "dynamic") and factor:
        return int(limit * factor)
    if (
        rope_type == "yarn" and factor and "short_factor" not in scaling
    ):  # with short_factor: Phi-3's longrope
        # The config's own field wins over the RoPE dict's, as transformers reads it.
        original = (
            text.get("original_max_position_embeddings")
            or scaling.get("original_max_position_embeddings")
            or limit
        )
        return max(limit, int(original * factor))
    return limit


def model_vocab_size(model_config: dict[str, Any]) -> int:
    vocab_size = _text_config(model_config).get("vocab_size") or model_config.get("vocab_size")
    if not vocab_size:
        raise ValueError("the model's config.json has no vocab_size")
    return int(vocab_size)
