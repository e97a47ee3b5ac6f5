"""Size and allocate the paged KV cache from a memory budget."""

from __future__ import annotations

import logging
import math
import mmap

import torch

from batchlm.config import EngineConfig
from batchlm.layers.quantization.forms import check_fp8_device
from batchlm.models.loader import ModelShape
from batchlm.runner.host_memory import available_host_bytes

logger = logging.getLogger(__name__)

GIB = 1 << 30
# The CPU KV cache when --cpu-kv-cache-gib is not given is at most this (and no more than the running
# requests can fill).
DEFAULT_CPU_KV_CACHE_GIB = 2.0
# --kv-cache-dtype names of the CPU caches' dtypes.
CPU_CACHE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# The default CPU KV cache takes no more than this share of the memory available after the model loads.
DEFAULT_SHARE_OF_AVAILABLE = 0.5


def resolve_kv_cache_dtype(
    name: str, model_dtype: torch.dtype, device: torch.device, backend: str, quantized_weights: bool = False
) -> torch.dtype:
    """--kv-cache-dtype: "auto" is the model dtype, except float16 for a float32 model on the CPU from a
    GGUF file or with quantized weights (--quantization int8), as llama.cpp keeps a GGUF model's cache:
    quantized outputs already depart from the float model's more than half-precision keys and values
    move them, while a dense checkpoint keeps the float32 cache its exactness against transformers
    rests on.
    "fp16" and "fp32" are float16 and float32 on the CPU (read by the C kernels and torch's path
    alike); "fp8" is e4m3, read by the Triton kernels only."""
    if name == "auto":
        if device.type == "cpu" and quantized_weights and model_dtype == torch.float32:
            return torch.float16
        return model_dtype
    if name in CPU_CACHE_DTYPES:
        if device.type != "cpu":
            raise ValueError(
                f"--kv-cache-dtype {name} is for the CPU (here: {device.type}); on a GPU auto keeps the "
                "model's 16-bit dtype and fp8 halves it"
            )
        return CPU_CACHE_DTYPES[name]
    if name != "fp8":
        raise ValueError(f"unknown --kv-cache-dtype {name!r}; choose auto, fp16, fp32 or fp8")
    if device.type != "cuda" or backend != "triton":
        raise ValueError(
            f"--kv-cache-dtype fp8 needs a CUDA GPU and the Triton attention kernels (here: {device.type}, "
            f"{backend} attention); use --kv-cache-dtype auto"
        )
    check_fp8_device(device, "--kv-cache-dtype fp8")
    return torch.float8_e4m3fn


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    return "fp8_e4m3" if dtype == torch.float8_e4m3fn else str(dtype).removeprefix("torch.")


def log_kv_cache(num_blocks: int, block_size: int, dtype: torch.dtype, max_model_len: int) -> None:
    """The cache's size at start-up, and a warning where it holds fewer tokens than the context."""
    tokens = num_blocks * block_size
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens, %s)",
        num_blocks,
        block_size,
        tokens,
        kv_cache_dtype_name(dtype),
    )
    if tokens < max_model_len:
        logger.warning(
            "The KV cache holds %d tokens, fewer than the context of %d: requests without max_tokens "
            "are cut to what it holds, and those whose prompt and max_tokens exceed it are refused (a larger "
            "cache, or a shorter --max-model-len, changes that)",
            tokens,
            max_model_len,
        )


def layer_kv_scales(
    checkpoint_scales: dict[int, dict[str, float]], num_layers: int
) -> list[tuple[float, float]]:
    """(k_scale, v_scale) per layer: the checkpoint's where it stores them, else 1.0."""
    return [
        (checkpoint_scales.get(i, {}).get("k", 1.0), checkpoint_scales.get(i, {}).get("v", 1.0))
        for i in range(num_layers)
    ]


def bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one block of tokens."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * element


def start_peak_measurement(device: torch.device) -> None:
    """Before the profile run: kv_budget_bytes sizes the KV cache from this process's peak from here
    on, so that neither an engine this process ran and dropped before (its KV cache freed) nor this
    load's freed temporaries (dense copies quantized away) count."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def kv_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    """CPU: --cpu-kv-cache-gib, else DEFAULT_CPU_KV_CACHE_GIB (num_blocks_for lowers that default to what
    the running requests can use). GPU: the utilisation fraction of total memory, less what this process
    already holds at its peak (weights + activations of the profile run) and what other processes hold."""
    if device.type != "cuda":
        gib = DEFAULT_CPU_KV_CACHE_GIB if config.cpu_kv_cache_gib is None else config.cpu_kv_cache_gib
        return int(gib * GIB)
    free, total = torch.cuda.mem_get_info(device)
    ours_now = torch.cuda.memory_reserved(device)
    used_by_others = total - free - ours_now
    peak = torch.cuda.max_memory_reserved(device)
    budget = int(total * config.gpu_memory_utilization) - peak - max(used_by_others, 0)
    logger.info(
        "GPU memory: total %.1f GiB, peak in use %.2f GiB, others %.2f GiB -> KV cache budget %.2f GiB",
        total / GIB,
        peak / GIB,
        used_by_others / GIB,
        budget / GIB,
    )
    return budget


def blocks_in_use_at_most(config: EngineConfig, max_model_len: int) -> int:
    """The blocks max_num_seqs running requests of max_model_len tokens hold at most."""
    return config.max_num_seqs * -(-max_model_len // config.block_size)


def num_blocks_for(
    config: EngineConfig, shape: ModelShape, dtype: torch.dtype, device: torch.device, max_model_len: int
) -> int:
    per_block = bytes_per_block(shape, config.block_size, dtype)
    if config.num_gpu_blocks_override is not None:
        if device.type == "cuda":
            warn_override_past_budget(config, per_block, kv_budget_bytes(config, device))
        return config.num_gpu_blocks_override
    num_blocks = kv_budget_bytes(config, device) // per_block
    if num_blocks < 1 and device.type != "cuda":
        # A CPU budget is a size asked for, not memory left over: say how far below one block it is.
        gib = DEFAULT_CPU_KV_CACHE_GIB if config.cpu_kv_cache_gib is None else config.cpu_kv_cache_gib
        raise ValueError(
            f"--cpu-kv-cache-gib {gib:g} holds no KV-cache block: one block of {config.block_size} tokens "
            f"takes {per_block} bytes ({per_block / GIB:.2g} GiB); raise it"
            # A block size raised far above the default is the likelier mistake than the cache size.
            + ("" if config.block_size <= EngineConfig.block_size else ", or lower --block-size")
        )
    if num_blocks < 1:
        raise ValueError(
            "no memory is left for the KV cache after loading the model: raise --gpu-memory-utilization "
            "or lower --max-num-batched-tokens"
            # One block of a block size far above the default may be what does not fit.
            + ("" if config.block_size <= EngineConfig.block_size else " or --block-size")
        )
    if device.type != "cuda":
        if config.cpu_kv_cache_gib is None:
            # CPU memory is the host's too: take no more than the running requests can fill.
            num_blocks = min(num_blocks, blocks_in_use_at_most(config, max_model_len))
        num_blocks = fit_host_memory(config, num_blocks, per_block, available_host_bytes())
    return int(num_blocks)


def warn_override_past_budget(config: EngineConfig, per_block: int, budget: int) -> None:
    """--num-gpu-blocks-override sets the cache's size whatever the memory: say so where it takes
    more than --gpu-memory-utilization leaves, since the CUDA graphs and the largest steps then find
    less than they were measured to need (or the cache itself does not fit)."""
    override = config.num_gpu_blocks_override
    assert override is not None
    fitting = max(budget, 0) // per_block
    if override > fitting:
        logger.warning(
            "--num-gpu-blocks-override %d takes %.2f GiB, more than the %d blocks (%.2f GiB) that "
            "--gpu-memory-utilization %g leaves for the KV cache: start-up or a large step may run out of "
            "GPU memory",
            override,
            override * per_block / GIB,
            fitting,
            fitting * per_block / GIB,
            config.gpu_memory_utilization,
        )


def kv_cache_oom_message(config: EngineConfig, num_blocks: int, per_block: int) -> str:
    """What start-up says when the KV cache it sized does not fit in GPU memory."""
    size = f"{num_blocks} KV-cache blocks ({num_blocks * per_block / GIB:.2f} GiB)"
    if config.num_gpu_blocks_override is not None:
        return f"{size} do not fit in GPU memory: lower --num-gpu-blocks-override"
    # Another process took memory between the measurement and the allocation.
    return f"{size} do not fit in GPU memory any more: lower --gpu-memory-utilization"


def fit_host_memory(config: EngineConfig, num_blocks: int, per_block: int, available: int | None) -> int:
    """A CPU cache's pages are taken only as its blocks fill (zeroed_host_tensor), so one larger than the
    memory left would fail mid-serving, not at start: an explicit --cpu-kv-cache-gib beyond what is
    available is refused here, and the default is lowered to DEFAULT_SHARE_OF_AVAILABLE of it. Each
    tensor-parallel rank (a process on this host) holds a cache of its own, so each gets its share."""
    if available is None:
        return num_blocks
    available //= max(1, config.tensor_parallel_size)
    if num_blocks * per_block <= available * DEFAULT_SHARE_OF_AVAILABLE:
        return num_blocks
    if config.cpu_kv_cache_gib is not None:
        if num_blocks * per_block <= available:
            return num_blocks
        ranks = (
            ""
            if config.tensor_parallel_size <= 1
            else f" (a share for each of {config.tensor_parallel_size} ranks)"
        )
        raise ValueError(
            f"--cpu-kv-cache-gib {config.cpu_kv_cache_gib:g} is more than the {available / GIB:.1f} GiB of "
            f"memory available after loading the model{ranks}; lower it"
        )
    fitted = max(1, int(available * DEFAULT_SHARE_OF_AVAILABLE) // per_block)
    logger.warning(
        "KV cache: %d blocks (%.2f GiB, %.0f%% of the %.1f GiB of memory available) instead of %d; "
        "--cpu-kv-cache-gib sets its size",
        fitted,
        fitted * per_block / GIB,
        100 * DEFAULT_SHARE_OF_AVAILABLE,
        available / GIB,
        num_blocks,
    )
    return min(num_blocks, fitted)


def allocate_kv_caches(
    shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer, zeroed so that padding
    slots never hold NaNs that a masked matmul could spread."""
    size = (2, num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
    if device.type == "cpu":
        return [zeroed_host_tensor(size, dtype) for _ in range(shape.num_layers)]
    return [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]


def zeroed_host_tensor(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of zeros in fresh anonymous memory, which the kernel zeroes page by page as it is first
    touched: writing a CPU cache's zeros up front was most of the engine's start-up (BENCHMARKS.md), and
    the process holds only the blocks it has used."""
    count = math.prod(size)
    if count == 0:
        return torch.zeros(size, dtype=dtype)
    nbytes = count * dtype.itemsize
    private = getattr(mmap, "MAP_PRIVATE", None)
    if private is None:  # Windows: its anonymous mappings are private and zeroed as well
        buffer = mmap.mmap(-1, nbytes)
    else:
        # No file: Python adds MAP_ANONYMOUS. Not advised into huge pages: a request's first block of
        # each layer would then zero 2 MB (BENCHMARKS.md).
        buffer = mmap.mmap(-1, nbytes, flags=private)
    # The tensor keeps the mapping alive; it is unmapped once the tensor is freed.
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(size)
