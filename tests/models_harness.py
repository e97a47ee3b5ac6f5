"""A tiny driver for our models in tests: paged KV cache, varlen steps, greedy decoding (no engine)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchlm.attention.backend import AttentionMetadata
from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.models.base import CausalLM
from batchlm.models.loader import LoadedModel, load_model
from batchlm.parallel.group import TensorParallelGroup

BLOCK_SIZE = 4
CPU = torch.device("cpu")
# The model tests' two prompts: a short one, and one that spans several blocks.
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11] * 3 + list(range(100, 121))]
# Our logprobs against transformers', fp32 on the CPU: they differ only by summation order.
LOGPROB_ATOL = 1e-4


def load_fp32_cpu(path: Path, **kwargs: Any) -> LoadedModel:
    """The model at `path` as the CPU tests run it: float32, no progress bar."""
    return load_model(path, torch.float32, CPU, progress=False, **kwargs)


@dataclass
class Chunk:
    """New tokens of one request this step: tokens[i] sits at position start + i."""

    tokens: list[int]
    start: int
    blocks: list[int]


def make_kv_caches(
    loaded: LoadedModel, num_blocks: int, block_size: int = BLOCK_SIZE, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Zeroed caches of every layer, in the model's dtype unless `dtype` is given."""
    s = loaded.shape
    return [
        torch.zeros(2, num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=dtype or loaded.dtype)
        for _ in range(s.num_layers)
    ]


def build_step(
    chunks: Sequence[Chunk], block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """input_ids [T], positions [T] and metadata for chunks ordered decodes (one token) first."""
    num_decodes = 0
    while (
        num_decodes < len(chunks) and len(chunks[num_decodes].tokens) == 1 and chunks[num_decodes].start > 0
    ):
        num_decodes += 1
    ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    for chunk in chunks:
        for i, token in enumerate(chunk.tokens):
            pos = chunk.start + i
            ids.append(token)
            positions.append(pos)
            slots.append(chunk.blocks[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + len(chunk.tokens))
        seq_lens.append(chunk.start + len(chunk.tokens))
    width = max(len(c.blocks) for c in chunks)
    tables = torch.zeros(len(chunks), width, dtype=torch.int32)
    for row, chunk in enumerate(chunks):
        tables[row, : len(chunk.blocks)] = torch.tensor(chunk.blocks, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        max_query_len=max(len(c.tokens) for c in chunks),
        max_seq_len=max(seq_lens),
        num_decodes=num_decodes,
    )
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), meta


@torch.no_grad()
def run_step(model: CausalLM, kv_caches: list[torch.Tensor], chunks: Sequence[Chunk]) -> torch.Tensor:
    """Logits [B, vocab] of each chunk's last token, widened to float32 (the model makes them in its
    own dtype)."""
    input_ids, positions, meta = build_step(chunks, kv_caches[0].shape[2])
    hidden = model(input_ids, positions, kv_caches, meta, TorchAttentionBackend())
    last_rows = torch.tensor(meta.query_start_loc_cpu[1:]) - 1
    return model.compute_logits(hidden[last_rows]).float()


def assert_mixed_batch_matches_requests_alone(loaded: LoadedModel) -> None:
    """A decode, a new prompt and a prefill's second chunk in one step give each request's hidden
    states as running it alone does (fresh caches, block tables of other shapes)."""
    first, second, third = [3, 4, 5, 6, 7, 8], [9, 10, 11], list(range(20, 33))
    caches = make_kv_caches(loaded, 12)
    run_step(loaded.model, caches, [Chunk(first, 0, [4, 0]), Chunk(third[:6], 0, [7, 2, 10, 5])])
    batched = run_step(
        loaded.model,
        caches,
        [Chunk([50], 6, [4, 0]), Chunk(second, 0, [1]), Chunk(third[6:], 6, [7, 2, 10, 5])],
    )
    alone = [
        run_step(loaded.model, make_kv_caches(loaded, 4), [Chunk(tokens, 0, [0, 1, 2, 3])])
        for tokens in ([*first, 50], second, third)
    ]
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)


def greedy_generate(
    loaded: LoadedModel, prompt: list[int], max_new_tokens: int, blocks: list[int] | None = None
) -> tuple[list[int], torch.Tensor]:
    """Prefill then token-by-token decode; returns the tokens and their log-softmax rows [N, vocab]."""
    total = len(prompt) + max_new_tokens
    needed = -(-total // BLOCK_SIZE)
    blocks = blocks if blocks is not None else list(range(needed))
    kv_caches = make_kv_caches(loaded, max(blocks) + 1)
    logits = run_step(loaded.model, kv_caches, [Chunk(list(prompt), 0, blocks)])
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        logprobs.append(torch.log_softmax(logits[0], dim=-1))
        tokens.append(int(logits[0].argmax()))
        if step + 1 < max_new_tokens:
            logits = run_step(loaded.model, kv_caches, [Chunk([tokens[-1]], len(prompt) + step, blocks)])
    return tokens, torch.stack(logprobs)


@torch.no_grad()
def hf_greedy(
    hf_model: torch.nn.Module, prompt: list[int], max_new_tokens: int, use_cache: bool = True
) -> tuple[list[int], torch.Tensor]:
    """transformers' generate(do_sample=False) with EOS disabled (so it always runs max_new_tokens):
    the tokens and the log-softmax rows [N, vocab] of its step-by-step logits. use_cache=False runs
    the model over the whole sequence at every step."""
    hf_model.generation_config.eos_token_id = None
    out = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=use_cache,
    )
    logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
    return out.sequences[0, len(prompt) :].tolist(), logprobs


def assert_greedy_matches_hf(
    loaded: LoadedModel,
    hf_model: torch.nn.Module,
    prompts: Sequence[list[int]],
    new_tokens: int,
    use_cache: bool = True,
) -> None:
    """Prompt by prompt: our greedy tokens are transformers' (hf_greedy), and their logprobs within
    LOGPROB_ATOL."""
    for prompt in prompts:
        ours, our_logprobs = greedy_generate(loaded, prompt, new_tokens)
        theirs, their_logprobs = hf_greedy(hf_model, prompt, new_tokens, use_cache)
        assert ours == theirs
        torch.testing.assert_close(our_logprobs, their_logprobs, atol=LOGPROB_ATOL, rtol=0)


def hf_generated(hf_model: Any, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy generate of exactly num_tokens after `prompt` (min_new_tokens keeps EOS
    off until then), on the model's device."""
    ids = torch.tensor([prompt], device=hf_model.device)
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()  # type: ignore[no-any-return]


class Rendezvous:
    """Lets N threads, one per fake rank, swap tensors for a collective."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * size

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor
        self.barrier.wait()
        parts = [t for t in self.slots if t is not None]
        self.barrier.wait()  # nobody overwrites a slot before everyone has read them all
        return parts


@dataclass(frozen=True)
class ThreadGroup(TensorParallelGroup):
    """A tensor-parallel group whose ranks are threads of this process (tests only)."""

    hub: Rendezvous | None = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        assert self.hub is not None
        return torch.stack(self.hub.exchange(self.rank, tensor)).sum(dim=0)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        assert self.hub is not None
        return torch.cat(self.hub.exchange(self.rank, tensor), dim=dim)


def hf_gemma3_multimodal(text_config: dict[str, Any], seed: int) -> Any:
    """A random transformers Gemma3ForConditionalGeneration (float32, eval) around `text_config`, with
    the tiny vision tower a multimodal Gemma 3 checkpoint holds beside its text model."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 28, "patch_size": 14}  # fmt: skip
    config = Gemma3Config(
        text_config=text_config, vision_config=vision, mm_tokens_per_image=4, image_token_index=300
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config).float().eval()


def hf_reference_model(model_dir: Path) -> Any:
    """transformers' model of a checkpoint directory (float32, eval): its causal LM, or the whole
    image-text-to-text model of a multimodal checkpoint (which generates from text prompts alike)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    architecture = (AutoConfig.from_pretrained(model_dir).architectures or [""])[0]
    auto = (
        AutoModelForImageTextToText
        if architecture.endswith("ForConditionalGeneration")
        else AutoModelForCausalLM
    )
    return auto.from_pretrained(model_dir, dtype=torch.float32).eval()


def thread_groups(size: int) -> list[ThreadGroup]:
    hub = Rendezvous(size)
    return [ThreadGroup(rank, size, None, hub) for rank in range(size)]


def run_ranks(fn: Callable[[int], Any], size: int) -> list[Any]:
    """fn(rank) for every rank, concurrently (their collectives meet in the middle)."""
    with ThreadPoolExecutor(max_workers=size) as pool:
        return list(pool.map(fn, range(size)))
