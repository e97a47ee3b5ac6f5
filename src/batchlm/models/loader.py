"""Build a model from an HF checkpoint directory: config, weights (or random init), LoRA merge."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchlm.layers.moe import FusedMoE, stacks_allocated_later
from batchlm.layers.norm import RMSNorm
from batchlm.layers.quantization import reference_rows
from batchlm.layers.quantization.cpu_quantized import CpuQuantizedLinearMethod
from batchlm.layers.quantization.dense import DequantizeLinearMethod
from batchlm.layers.quantization.registry import (
    DENSE_FORMAT,
    FLOAT_QTYPES,
    GGUF_FORMAT,
    MXFP4_QTYPE,
)
from batchlm.models.base import CausalLM
from batchlm.models.checkpoint import find_safetensors, iter_safetensors, load_hf_config
from batchlm.models.config_view import read_config_view
from batchlm.models.gguf_file import iter_gguf_tensors, open_gguf, tensor_types
from batchlm.models.gguf_model_dir import gguf_source
from batchlm.models.gguf_progress import with_progress
from batchlm.models.gguf_types import REFERENCE_TYPES, SUPPORTED_TYPES
from batchlm.models.load_checks import (
    check_checkpoint_scheme,
    check_gguf_quantization,
    check_quantization,
    dequantized_weights_summary,
    mxfp4_experts_summary,
)
from batchlm.models.lora import LoraAdapter, load_lora_adapter, merge_lora
from batchlm.models.model_config import ModelConfig
from batchlm.models.quantized_checkpoint import (
    FP8,
    MXFP4,
    Assembler,
    CheckpointScheme,
    checkpoint_names,
    declares_mxfp4,
    quantized_weight_types,
    read_checkpoint_scheme,
)
from batchlm.models.registry import architecture_of, get_model_class
from batchlm.models.weight_methods import (
    assign_weight_methods,
    expert_types,
    finish_quantized,
    quantize_linears,
    random_expert_types,
)
from batchlm.models.weights import load_named_weights
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup
from batchlm.startup_log import timed_phase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the runner needs to allocate the KV cache and check requests."""

    num_layers: int
    # Attention heads on this rank.
    num_heads: int
    # KV heads on this rank (1 when KV heads are replicated because there are fewer than ranks).
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    # Full vocabulary (logits are gathered across ranks).
    vocab_size: int
    # Context limit from the config (RoPE scaling applied; a sliding window does not cap it).
    max_model_len: int


@dataclass
class LoadedModel:
    """A model ready to run, with what it was built from."""

    model: CausalLM
    hf_config: Any  # transformers PretrainedConfig, or a ConfigView that reads the same
    model_dir: Path
    shape: ModelShape
    dtype: torch.dtype
    device: torch.device
    # Per-layer KV-cache scales a quantized checkpoint stores: layer -> {"k": s, "v": s}.
    kv_scales: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        """The typed config the model was built from."""
        return self.model.config


def model_shape(config: ModelConfig, tp: TensorParallelGroup = SINGLE_RANK) -> ModelShape:
    return ModelShape(
        num_layers=config.num_layers,
        num_heads=config.num_heads // tp.size,
        num_kv_heads=max(1, config.num_kv_heads // tp.size),
        head_dim=config.head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_model_len=config.max_model_len,
    )


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created directly in the target dtype and on the target device: no float32 copy.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    adapter_path: str | None = None,
    hf_overrides: dict[str, Any] | None = None,
    tp: TensorParallelGroup | None = None,
    random_weights: bool = False,
    seed: int = 0,
    progress: bool = True,
    quantization: str | None = None,
) -> LoadedModel:
    """Load a Llama/Mistral/Qwen2/Qwen3 checkpoint (or random weights of its shape) onto `device`.

    Raises ValueError naming the problem: missing config.json, unsupported architecture, missing,
    unexpected or misshapen tensors, missing safetensors, or an adapter that does not fit.
    """
    tp = tp or SINGLE_RANK
    model_dir, device = Path(model_dir), torch.device(device)
    with timed_phase(logger, "model config"):
        # The light view when it reads the same; transformers' config class costs seconds to import.
        config = read_config_view(model_dir, hf_overrides) or load_hf_config(model_dir, hf_overrides)
        model_class = get_model_class(architecture_of(config))
        model_config = model_class.read_config(config)
    if random_weights and adapter_path:
        raise ValueError(
            "a LoRA adapter cannot be merged into random weights; drop adapter_path or random_weights"
        )
    gguf_file = gguf_source(model_dir)
    if gguf_file is not None and adapter_path:
        raise ValueError("LoRA adapters cannot be merged into a GGUF model; use its safetensors checkpoint")
    files = [] if random_weights or gguf_file is not None else find_safetensors(model_dir)
    adapter = load_lora_adapter(adapter_path) if adapter_path else None
    if device.type == "cuda":
        # CUDA's one-time context set-up, timed apart so the build below is not charged with it.
        with timed_phase(logger, "CUDA context"):
            torch.zeros(1, device=device)
    # Experts' dense stacks wait for their weight method: MXFP4 experts on a GPU never take them.
    with (
        timed_phase(logger, "model build"),
        _default_dtype(dtype),
        torch.device(device),
        stacks_allocated_later(),
    ):
        model = model_class(model_config, tp)
    check_quantization(quantization, device, random_weights, gguf_file is not None)
    # Random weights take only an MXFP4 config's form (its experts), and no other scheme's checks.
    if random_weights:
        scheme = CheckpointScheme(MXFP4) if declares_mxfp4(model_dir) else None
    else:
        scheme = None if gguf_file is not None else read_checkpoint_scheme(model_dir)
    if scheme is not None and scheme.kind == MXFP4 and not model_class.loads_mxfp4_experts:
        raise ValueError(
            f"quantization method 'mxfp4' holds gpt-oss's experts; {model_class.__name__} does not load it"
        )
    kv_scales: dict[int, dict[str, float]] = {}
    if random_weights:
        # Random MXFP4 experts where a checkpoint's would stay MXFP4 (a GPU); elsewhere random dense.
        mxfp4 = scheme is not None and device.type == "cuda"  # (the only scheme random weights take)
        _random_weights(model, model_config, device, dtype, seed, quantization, mxfp4)
    elif gguf_file is not None:
        with timed_phase(logger, "weight load (GGUF)"):
            _load_gguf(model, gguf_file, device, dtype, quantization)
    else:
        check_checkpoint_scheme(scheme, quantization, adapter)
        qtypes = quantized_weight_types(checkpoint_names(files), scheme) if scheme else {}
        methods = assign_weight_methods(model, DENSE_FORMAT, qtypes, device, dtype, quantization)
        if scheme is not None or quantization:
            what = f"{scheme.kind} checkpoint" if scheme else f"--quantization {quantization}"
            logger.info("%s: layers per weight method %s", what, dict(methods))
        if scheme is not None and scheme.kind == FP8 and methods[DequantizeLinearMethod.__name__]:
            logger.warning(
                "FP8 checkpoint on a GPU without FP8 tensor cores (%s): its linears are dequantized to "
                "dense %s as they load (twice FP8's memory)%s",
                device,
                str(dtype).removeprefix("torch."),
                "; its experts stay FP8" if methods["FP8 experts"] else "",
            )
        if scheme is not None and scheme.bits == 8 and methods[DequantizeLinearMethod.__name__]:
            logger.warning(
                "8-bit %s checkpoint on %s: no kernel of ours reads 8-bit groups there, so its weights "
                "are dequantized to dense %s as they load (twice their memory); on an x86-64 CPU they "
                "run as 8-bit blocks on our quantized kernels",
                scheme.kind,
                device,
                str(dtype).removeprefix("torch."),
            )
        if scheme is not None and scheme.dequantized_at_load:
            experts = any(isinstance(module, FusedMoE) for module in model.modules())
            summary = dequantized_weights_summary(methods, dtype, device, experts)
            logger.info("block-wise FP8 checkpoint: %s", summary)
        if scheme is not None and scheme.kind == MXFP4:
            logger.info("MXFP4 checkpoint: %s", mxfp4_experts_summary(methods, dtype, device))
        with timed_phase(logger, "weight load"):
            kv_scales = _load_checkpoint(model, files, adapter, progress, scheme, set(qtypes), device, dtype)
    finish_quantized(model)
    model.eval()
    return LoadedModel(model, config, model_dir, model_shape(model_config, tp), dtype, device, kv_scales)


def _random_weights(
    model: CausalLM,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    quantization: str | None,
    mxfp4_experts: bool = False,
) -> None:
    """Random dense weights; under --quantization fp8 / w4a16 then quantized as a checkpoint's would be.
    `mxfp4_experts`: the experts random MXFP4 stacks, as an MXFP4 checkpoint's load on a GPU; under
    --quantization fp8 / w4a16 random FP8 or 4-bit stacks where a checkpoint's would be (a GPU)."""
    qtypes: dict[str, str] = {}
    if mxfp4_experts:
        qtypes = expert_types(model, MXFP4_QTYPE)
    elif quantization is not None:
        qtypes = random_expert_types(model, quantization, device)
    methods = assign_weight_methods(model, DENSE_FORMAT, qtypes, device, dtype)
    with timed_phase(logger, "random weight init"):
        init_random_weights(model, std=config.initializer_range, seed=seed)
    for form in ("MXFP4", "FP8", "INT4"):
        if methods[f"{form} experts"]:
            logger.info("random weights: experts as %s stacks on %s", form, device)
    if quantization:
        with timed_phase(logger, f"random weights to {quantization}"):
            methods = quantize_linears(model, device, dtype, quantization)
        logger.info("--quantization %s: layers per weight method %s", quantization, dict(methods))


def _load_checkpoint(
    model: CausalLM,
    files: list[Path],
    adapter: LoraAdapter | None,
    progress: bool,
    scheme: CheckpointScheme | None = None,
    quantized_weights: set[str] | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[int, dict[str, float]]:
    """Load the safetensors into the model; returns the KV-cache scales a quantized checkpoint holds."""
    weights = iter_safetensors(files, progress)
    if adapter is not None:
        # Deltas merge into the checkpoint's tensors as named there (before a family splits or renames them).
        adapter.check_targets(set(checkpoint_names(files)), model.tie_word_embeddings)
        weights = merge_lora(weights, adapter)
    if scheme is None or not scheme.assembled:
        load_named_weights(model, weights)
        return {}
    modules = {name.removesuffix(".weight") for name in quantized_weights or set()}
    assembler = Assembler(scheme, modules, device or torch.device("cpu"), dtype)
    load_named_weights(model, assembler.run(weights))
    return assembler.kv_scales


def _load_gguf(
    model: CausalLM, gguf_file: Path, device: torch.device, dtype: torch.dtype, quantization: str | None
) -> None:
    reader = open_gguf(gguf_file)
    types = tensor_types(reader)
    check_gguf_quantization(gguf_file, types, quantization)
    methods = assign_weight_methods(model, GGUF_FORMAT, types, device, dtype, quantization)
    logger.info("GGUF %s: layers per weight method %s", gguf_file.name, dict(methods))
    # Off the quantized CPU kernels every block type dequantizes through the gguf package's numpy code.
    slow = REFERENCE_TYPES if methods[CpuQuantizedLinearMethod.__name__] else SUPPORTED_TYPES - FLOAT_QTYPES
    with reference_rows.one_pool():  # one thread pool for every tensor's dequantization
        load_named_weights(
            model, with_progress(iter_gguf_tensors(reader), reader, f"GGUF {gguf_file.name}", slow)
        )


@torch.no_grad()
def init_random_weights(model: CausalLM, std: float, seed: int) -> None:
    """Normal(0, std) matrices, zero biases, unit norm weights, generated on the model's device."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for module in model.modules():
        if isinstance(module, FusedMoE) and module.stacks is not None:
            module.stacks.fill_random(std, generator)
    for name, param in model.named_parameters():
        if id(param) in norm_params:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)
