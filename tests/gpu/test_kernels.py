"""Triton paged-attention kernels against the plain-torch reference (batchlm.kernels.reference).

GPU only (marked `gpu`; skipped without CUDA and triton). Without a GPU, TRITON_INTERPRET=1 runs the
fp16/fp32 cases through Triton's CPU interpreter (its bf16 dot is broken, so bf16 cases skip there).
Tolerances, max abs error against a float32 reference on N(0, 1) inputs: bf16 2e-2, fp16 4e-3, fp32 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch
from devices import DEVICE, INTERPRET, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from batchlm.kernels.fused_ops import rotary_embedding_  # noqa: E402
from batchlm.kernels.kv_write import rotate_and_write_kv_cache, write_kv_cache  # noqa: E402
from batchlm.kernels.paged_decode import DecodeConfig, paged_decode_attention  # noqa: E402
from batchlm.kernels.paged_prefill import PrefillConfig, paged_prefill_attention  # noqa: E402
from batchlm.kernels.reference import (  # noqa: E402
    paged_attention_reference,
    write_kv_cache_reference,
)

ATOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
HALF_DTYPES = [torch.bfloat16, torch.float16]
NUM_KV_HEADS = 2


def skip_if_interpreted(dtype: torch.dtype) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter mis-computes bf16 dots")


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "NaN in kernel output"
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0.0)


def random_cache(num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, num_blocks, block_size, NUM_KV_HEADS, head_dim, device=DEVICE).to(dtype)


def random_block_tables(
    seq_lens: list[int], block_size: int, num_blocks: int, extra: int = 3
) -> torch.Tensor:
    """Distinct, shuffled blocks per request (so paging is exercised), padded with 0 past the end."""
    needed = [math.ceil(s / block_size) for s in seq_lens]
    assert sum(needed) <= num_blocks
    perm = torch.randperm(num_blocks).tolist()
    table = torch.zeros(len(seq_lens), max(needed, default=0) + extra, dtype=torch.int32)
    used = 0
    for row, count in enumerate(needed):
        table[row, :count] = torch.tensor(perm[used : used + count], dtype=torch.int32)
        used += count
    return table.to(DEVICE)


def blocks_for(seq_lens: list[int], block_size: int) -> int:
    return sum(math.ceil(s / block_size) for s in seq_lens) + 4


def int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def cumulative(lengths: list[int]) -> list[int]:
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return starts


# ---------------------------------------------------------------- KV write


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_scatters_to_slots_and_skips_padding(dtype: torch.dtype, block_size: int) -> None:
    torch.manual_seed(0)
    cache = random_cache(12, block_size, 64, dtype)
    expected = cache.clone()
    num_tokens = 40
    # Keys/values as views into a fused projection output: non-contiguous token stride.
    fused = torch.randn(num_tokens, 3, NUM_KV_HEADS, 64, device=DEVICE).to(dtype)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(12 * block_size, device=DEVICE)[:num_tokens]
    slots[::7] = -1
    write_kv_cache(key, value, cache, slots)
    write_kv_cache_reference(key, value, expected, slots)
    assert torch.equal(cache, expected)
    flat = cache.view(2, -1, NUM_KV_HEADS, 64)
    assert torch.equal(flat[0, slots[1]], key[1]) and torch.equal(flat[1, slots[1]], value[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(32, 8, 64), (9, 3, 128), (4, 1, 16), (32, 32, 96), (14, 2, 80)]
)
def test_rope_folded_into_the_kv_write_matches_rope_then_write(
    dtype: torch.dtype, fp8: bool, heads: int, kv_heads: int, head_dim: int
) -> None:
    skip_if_interpreted(dtype)
    torch.manual_seed(0)
    rows, slot_rows, block_size, num_blocks = 37, 33, 16, 8
    # q, k and v as views of one fused projection output; rows past the slots are graph padding.
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    table = torch.randn(512, head_dim, device=DEVICE)
    positions = torch.randint(0, 512, (rows,), device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:slot_rows]
    slots[::5] = -1
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE).to(cache_dtype)
    expected_cache = cache.clone()
    scales = (0.5, 2.0) if fp8 else (1.0, 1.0)

    def split(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = fused[:, : heads * head_dim].view(rows, heads, head_dim)
        k = fused[:, heads * head_dim : (heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
        v = fused[:, (heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)
        return q, k, v

    expected_qkv = qkv.clone()
    q, k, v = split(expected_qkv)
    rotary_embedding_(positions, q, table)
    rotary_embedding_(positions, k, table)
    write_kv_cache(k[:slot_rows], v[:slot_rows], expected_cache, slots, *scales)
    q_before_rotation, k_before = split(qkv)[0].clone(), split(qkv)[1].clone()
    q, k, v = split(qkv)
    rotate_and_write_kv_cache(positions, table, q, k, v, cache, slots, *scales)
    assert torch.equal(q, split(expected_qkv)[0])
    assert not torch.equal(q, q_before_rotation)
    assert torch.equal(k, k_before)  # the keys themselves are left unrotated
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))
    assert bool(cache.view(torch.uint8).any())


def test_write_kv_rejects_mismatched_shapes() -> None:
    cache = random_cache(4, 16, 64, torch.float16)
    key = torch.randn(3, NUM_KV_HEADS, 32, device=DEVICE).half()
    with pytest.raises(ValueError, match="key must be"):
        write_kv_cache(key, key, cache, torch.zeros(3, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------- decode


def run_decode_case(
    seq_lens: list[int],
    block_size: int,
    head_dim: int,
    group: int,
    dtype: torch.dtype,
    num_splits: int | None,
    config: DecodeConfig | None = None,
) -> None:
    cache = random_cache(blocks_for(seq_lens, block_size), block_size, head_dim, dtype)
    tables = random_block_tables(seq_lens, block_size, cache.shape[1])
    query = torch.randn(len(seq_lens), NUM_KV_HEADS * group, head_dim, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))  # poisoned: every element must be written
    paged_decode_attention(
        query, cache, int32(seq_lens), tables, scale, out=out, num_splits=num_splits, config=config
    )
    ref = paged_attention_reference(query, cache, list(range(len(seq_lens) + 1)), seq_lens, tables, scale)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference(dtype: torch.dtype, group: int, head_dim: int, block_size: int) -> None:
    skip_if_interpreted(dtype)
    torch.manual_seed(1)
    seq_lens = [1, 2, 15, 16, 17, 64, 65, 333, 1000, *torch.randint(1, 2000, (7,)).tolist()]
    run_decode_case(seq_lens, block_size, head_dim, group, dtype, num_splits=None)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64, 256])
def test_decode_split_counts_agree(num_splits: int) -> None:
    torch.manual_seed(2)
    seq_lens = [1, 63, 64, 65, 130, 1000, 4097]
    run_decode_case(seq_lens, 16, 64, 4, torch.float16, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 5])
@pytest.mark.parametrize(
    "config",
    [DecodeConfig(32, 4, 2), DecodeConfig(64, 4, 1), DecodeConfig(128, 8, 3)],
)
def test_decode_tile_configs(config: DecodeConfig, num_splits: int) -> None:
    torch.manual_seed(8)
    run_decode_case([1, 31, 32, 33, 129, 700, 3000], 16, 128, 4, torch.float16, num_splits, config)


@pytest.mark.parametrize("head_dim", [16, 32, 256])
def test_decode_other_power_of_two_head_dims(head_dim: int) -> None:
    torch.manual_seed(3)
    run_decode_case([1, 40, 300, 900], 16, head_dim, 2, torch.float16, num_splits=None)


def test_decode_float32() -> None:
    torch.manual_seed(4)
    run_decode_case([3, 77, 512], 32, 64, 4, torch.float32, num_splits=3)


@pytest.mark.skipif(INTERPRET, reason="long contexts are too slow in the interpreter")
@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_long_contexts(num_splits: int | None) -> None:
    torch.manual_seed(5)
    run_decode_case([32768, 17001, 5], 16, 128, 4, torch.bfloat16, num_splits)
    run_decode_case([32000], 32, 64, 8, torch.bfloat16, num_splits)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_padding_rows_give_zeros(num_splits: int) -> None:
    torch.manual_seed(6)
    seq_lens = [0, 50, 0, 700, 0]
    run_decode_case(seq_lens, 16, 64, 4, torch.float16, num_splits=num_splits)
    cache = random_cache(64, 16, 64, torch.float16)
    query = torch.randn(2, 8, 64, device=DEVICE).half()
    tables = torch.zeros(2, 8, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(query, cache, int32([0, 0]), tables, 0.125, num_splits=num_splits)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_replays_in_cuda_graph_with_new_lengths() -> None:
    torch.manual_seed(7)
    block_size, head_dim, batch, max_blocks = 16, 64, 8, 64
    cache = random_cache(batch * max_blocks, block_size, head_dim, torch.bfloat16)
    query = torch.randn(batch, 8, head_dim, device=DEVICE).bfloat16()
    seq_lens = torch.ones(batch, dtype=torch.int32, device=DEVICE)
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(query)
    paged_decode_attention(query, cache, seq_lens, tables, 0.125, out=out)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(query, cache, seq_lens, tables, 0.125, out=out)
    for lengths in ([1, 5, 0, 1024, 17, 300, 999, 2], [1000] * batch):
        new_tables = random_block_tables(lengths, block_size, cache.shape[1], extra=0)
        tables.zero_()
        tables[:, : new_tables.shape[1]] = new_tables
        seq_lens.copy_(int32(lengths))
        query.copy_(torch.randn_like(query))
        graph.replay()
        ref = paged_attention_reference(query, cache, list(range(batch + 1)), lengths, tables, 0.125)
        assert_close(out, ref, torch.bfloat16)


def write_then_decode_graph(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    query: torch.Tensor,
    seq_lens: torch.Tensor,
    tables: torch.Tensor,
    out: torch.Tensor,
    num_splits: int,
    newest: int | None = None,
) -> torch.cuda.CUDAGraph:
    """A CUDA graph of a step's KV write and then its decode attention, launched as the engine
    launches them (with PDL where the GPU has it); each replay reads what the tensors hold then.
    newest: the most of a context's last tokens the write changes, as the engine tells the kernel."""

    def step() -> None:
        write_kv_cache(key, value, cache, slots)
        paged_decode_attention(
            query, cache, seq_lens, tables, 0.125, out=out, num_splits=num_splits, newest=newest
        )

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("newest", [None, 1])
@pytest.mark.parametrize("num_splits", [1, 8])
def test_decode_sees_the_newest_token_written_just_before_it_in_the_same_graph(
    num_splits: int, newest: int | None
) -> None:
    # Under PDL the kernel reads its first tile before the KV write ahead of it has finished; the
    # newest token's row must still be the one that write stores. Lengths put that row in the first
    # tile of its split (read again after the wait: the whole tile, or with `newest` that row alone)
    # and in a later tile (read only after it).
    torch.manual_seed(8)
    block_size, head_dim, batch, max_blocks = 16, 64, 4, 64
    cache = random_cache(batch * max_blocks, block_size, head_dim, torch.bfloat16)
    query = torch.randn(batch, 8, head_dim, device=DEVICE).bfloat16()
    key, value = (torch.randn(batch, NUM_KV_HEADS, head_dim, device=DEVICE).bfloat16() for _ in "kv")
    seq_lens = torch.ones(batch, dtype=torch.int32, device=DEVICE)
    slots = torch.zeros(batch, dtype=torch.int64, device=DEVICE)
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(query)

    graph = write_then_decode_graph(
        key, value, cache, slots, query, seq_lens, tables, out, num_splits, newest
    )
    for lengths in ([1, 40, 64, 700], [65, 16, 1000, 129]):
        new_tables = random_block_tables(lengths, block_size, cache.shape[1], extra=0)
        tables.zero_()
        tables[:, : new_tables.shape[1]] = new_tables
        seq_lens.copy_(int32(lengths))
        newest = [
            tables[row, (n - 1) // block_size] * block_size + (n - 1) % block_size
            for row, n in enumerate(lengths)
        ]
        slots.copy_(torch.stack(newest))
        for _ in range(2):
            for tensor in (query, key, value):
                tensor.copy_(torch.randn_like(tensor))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(cache[0].reshape(-1, NUM_KV_HEADS, head_dim)[slots], key)
            ref = paged_attention_reference(query, cache, list(range(batch + 1)), lengths, tables, 0.125)
            assert_close(out, ref, torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("newest", [None, 4])
@pytest.mark.parametrize("num_splits", [1, 8])
@pytest.mark.parametrize("first", [40, 62])
def test_verify_rows_see_every_row_their_chunk_wrote_just_before_them_in_the_same_graph(
    num_splits: int, first: int, newest: int | None
) -> None:
    # A verify chunk's tokens at positions first .. first + 3 become four decode rows of one request
    # (runner/decode_rows.py): the KV write stores all four, then row i attends to positions up to
    # first + i. Under PDL the kernel reads its first tile before that write has finished, so rows
    # the chunk wrote before a row's own must be read again too, not only its newest (a split's
    # first tile holds them here; 62 puts the chunk across a block edge).
    torch.manual_seed(9)
    block_size, head_dim, rows, max_blocks = 16, 64, 4, 16
    cache = random_cache(max_blocks, block_size, head_dim, torch.bfloat16)
    lengths = [first + 1 + i for i in range(rows)]
    table = random_block_tables([lengths[-1]], block_size, cache.shape[1], extra=0)
    tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=DEVICE)
    tables[:, : table.shape[1]] = table[0]
    seq_lens = int32(lengths)
    slots = torch.stack(
        [table[0, (n - 1) // block_size] * block_size + (n - 1) % block_size for n in lengths]
    )
    query = torch.randn(rows, 8, head_dim, device=DEVICE).bfloat16()
    key, value = (torch.randn(rows, NUM_KV_HEADS, head_dim, device=DEVICE).bfloat16() for _ in "kv")
    out = torch.empty_like(query)

    graph = write_then_decode_graph(
        key, value, cache, slots, query, seq_lens, tables, out, num_splits, newest
    )
    for _ in range(4):
        for tensor in (query, key, value):
            tensor.copy_(torch.randn_like(tensor))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_attention_reference(query, cache, list(range(rows + 1)), lengths, tables, 0.125)
        assert_close(out, ref, torch.bfloat16)


# ---------------------------------------------------------------- prefill


def run_prefill_case(
    contexts: list[int],
    chunks: list[int],
    block_size: int,
    head_dim: int,
    group: int,
    dtype: torch.dtype,
    config: PrefillConfig | None = None,
) -> None:
    """Requests with `contexts[i]` cached tokens extended by `chunks[i]` new ones."""
    seq_lens = [c + n for c, n in zip(contexts, chunks, strict=True)]
    cache = random_cache(blocks_for(seq_lens, block_size), block_size, head_dim, dtype)
    tables = random_block_tables(seq_lens, block_size, cache.shape[1])
    starts = cumulative(chunks)
    query = torch.randn(starts[-1], NUM_KV_HEADS * group, head_dim, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(
        query, cache, int32(starts), int32(seq_lens), tables, scale, max(chunks), out=out, config=config
    )
    ref = paged_attention_reference(query, cache, starts, seq_lens, tables, scale)
    assert_close(out, ref, dtype)


PREFILL_CONTEXTS = [0, 0, 45, 96, 16, 300, 7]
PREFILL_CHUNKS = [1, 37, 1, 64, 16, 129, 250]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_matches_reference(dtype: torch.dtype, group: int, head_dim: int, block_size: int) -> None:
    skip_if_interpreted(dtype)
    torch.manual_seed(10)
    run_prefill_case(PREFILL_CONTEXTS, PREFILL_CHUNKS, block_size, head_dim, group, dtype)


@pytest.mark.parametrize(
    "config",
    [
        PrefillConfig(16, 16, 4, 1),
        PrefillConfig(32, 32, 4, 2),
        PrefillConfig(64, 128, 4, 2),
        PrefillConfig(64, 64, 4, 3),
        PrefillConfig(128, 32, 8, 2),
    ],
)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_prefill_tile_shapes(config: PrefillConfig, group: int) -> None:
    torch.manual_seed(11)
    run_prefill_case([0, 31, 200], [70, 5, 33], 16, 64, group, torch.float16, config)


@pytest.mark.parametrize("head_dim", [32, 256])
def test_prefill_other_head_dims(head_dim: int) -> None:
    torch.manual_seed(12)
    run_prefill_case([0, 50], [90, 20], 16, head_dim, 2, torch.float16)


def test_prefill_float32() -> None:
    torch.manual_seed(13)
    run_prefill_case([0, 70], [100, 9], 32, 64, 4, torch.float32)


@pytest.mark.skipif(INTERPRET, reason="long contexts are too slow in the interpreter")
def test_prefill_long_prefix_and_long_prompt() -> None:
    torch.manual_seed(14)
    run_prefill_case([30000, 0], [2048, 8192], 16, 128, 4, torch.bfloat16)
    run_prefill_case([31000], [1000], 32, 64, 8, torch.bfloat16)
