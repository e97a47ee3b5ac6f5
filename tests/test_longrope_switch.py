"""Phi-3's LongRoPE through the whole engine, as transformers applies it: a sequence longer than
original_max_position_embeddings rotates every position with the long factors, and one that grows past
that length has its cache recomputed. Greedy tokens equal transformers' for prompts on either side of
the switch and for sequences that cross it while decoding, alone, batched, in chunked prefill, after
preemption, from the prefix cache, with speculation and with async scheduling."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.layers.rotary import RopeSpec, build_rope, long_rope_switch
from scheduler_harness import make_request

ORIGINAL = 16
MAX_TOKENS = 14
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# head_dim 16: 8 frequencies.
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0],
            "long_factor": [1.5, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 40.0]}  # fmt: skip
OVERRIDES = {"rope_parameters": LONGROPE, "original_max_position_embeddings": ORIGINAL, "pad_token_id": 0}
# Gemma 3's per-layer-type parameters: LongRoPE on the global layer, plain RoPE on the local one.
GLOBAL_LAYERS_ONLY = {
    "rope_parameters": {"full_attention": {**LONGROPE, "original_max_position_embeddings": ORIGINAL},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    "layer_types": ["sliding_attention", "full_attention"],
    "head_dim": 16, "sliding_window": 4, "pad_token_id": 0,
}  # fmt: skip


def prompts() -> list[list[int]]:
    """Short prompts that cross the switch while decoding (one right at it), one of exactly the
    original length and long ones past it from the start."""
    generator = torch.Generator().manual_seed(4)
    return [torch.randint(10, 300, (n,), generator=generator).tolist() for n in (5, 10, 15, 16, 17, 30)]


def forget_cached_long_tables(hf: torch.nn.Module) -> None:
    """Drops the long-factor tables transformers caches on its rotary modules. Some versions (5.17)
    cache a per-layer-type table on the first long forward and then fail to read it back on the next
    one; without the cache each forward computes the table again, which is what the others do."""
    for module in hf.modules():
        for name in [name for name in vars(module) if name.endswith("_long_inv_freq")]:
            delattr(module, name)


def transformers_tokens(model_dir: Path, batch: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of transformers' model, each from a forward over the whole sequence so far (no
    cache): its LongRoPE picks the factors from the sequence's length, which is what its generate()
    does by recomputing the cache at the switch (in the versions that do)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = []
    for prompt in batch:
        ids = list(prompt)
        for _ in range(MAX_TOKENS):
            forget_cached_long_tables(hf)
            with torch.no_grad():
                logits = hf(torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
        tokens.append(ids[len(prompt) :])
    return tokens


def generate(model_dir: Path, batch: list[list[int]], **kwargs: Any) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=str(model_dir), device="cpu", **kwargs)
    return llm, [list(out.outputs[0].token_ids) for out in llm.generate(batch, GREEDY)]


@pytest.fixture(scope="module")
def phi3(tiny_model_dir: Callable[..., Path]) -> tuple[Path, list[list[int]]]:
    model_dir = tiny_model_dir("phi3", seed=9, **OVERRIDES)
    return model_dir, transformers_tokens(model_dir, prompts())


def test_the_long_rows_differ_from_the_per_position_ones() -> None:
    # Otherwise every test below would pass without the switch.
    params = {**LONGROPE, "original_max_position_embeddings": ORIGINAL, "max_position_embeddings": 64}
    rope = build_rope(RopeSpec(params, 16, 64), 16, 64)
    assert rope.long_switch is not None and rope.long_switch.table_offset == 64
    table = rope.cos_sin_cache
    assert table.shape == (128, 16)
    assert not torch.allclose(table[1:ORIGINAL], table[64 + 1 : 64 + ORIGINAL])
    torch.testing.assert_close(table[ORIGINAL:64], table[64 + ORIGINAL :], rtol=0, atol=0)
    assert long_rope_switch(rope, max_model_len=ORIGINAL) is None
    assert long_rope_switch(rope, max_model_len=ORIGINAL + 1) == rope.long_switch


@pytest.mark.parametrize("fused", ["1", "0"])
def test_alone_and_batched_match_transformers(
    phi3: tuple[Path, list[list[int]]], fused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "0": the generic CPU forward instead of the fused decode stack.
    monkeypatch.setenv("BATCHLM_CPU_FUSED_DECODE", fused)
    model_dir, expected = phi3
    _, alone = generate(model_dir, prompts()[1:2], max_num_seqs=1)
    assert alone == expected[1:2]
    llm, batched = generate(model_dir, prompts())
    assert batched == expected
    # Switching to the long rotation is a recomputation, not a preemption for want of blocks.
    assert llm.engine_core.stats().num_preemptions == 0


@pytest.mark.parametrize("fused", ["1", "0"])
def test_longrope_on_some_layers_only_matches_transformers(
    tiny_model_dir: Callable[..., Path], fused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The local layer's table takes the long sequences' offset positions too (they were past its rows).
    monkeypatch.setenv("BATCHLM_CPU_FUSED_DECODE", fused)
    model_dir = tiny_model_dir("gemma3_text", seed=3, **GLOBAL_LAYERS_ONLY)
    assert generate(model_dir, prompts())[1] == transformers_tokens(model_dir, prompts())


def test_chunked_prefill_and_async_scheduling_match_transformers(phi3: tuple[Path, list[list[int]]]) -> None:
    model_dir, expected = phi3
    assert generate(model_dir, prompts(), max_num_batched_tokens=6, max_num_seqs=3)[1] == expected
    assert generate(model_dir, prompts(), async_scheduling="on")[1] == expected


def test_preemption_matches_transformers(phi3: tuple[Path, list[list[int]]]) -> None:
    model_dir, expected = phi3
    llm, tokens = generate(
        model_dir, prompts(), block_size=4, num_gpu_blocks_override=16, enable_prefix_caching=False
    )
    assert tokens == expected
    assert llm.engine_core.stats().num_preemptions > 0


def test_speculation_matches_transformers(phi3: tuple[Path, list[list[int]]]) -> None:
    # Repetitive prompts give n-gram drafts right up to the switch.
    model_dir, _ = phi3
    batch = [[7, 8, 9] * 3, [20, 21] * 6, [30, 31, 32, 33] * 5]
    expected = transformers_tokens(model_dir, batch)
    llm, tokens = generate(model_dir, batch, speculative="ngram", num_speculative_tokens=4)
    assert tokens == expected
    assert llm.engine_core.stats().spec_proposed_tokens_total > 0


def test_prefix_cache_keeps_the_rotations_apart(phi3: tuple[Path, list[list[int]]]) -> None:
    # The same first 12 tokens, cached under the short rotation (by a sequence that never grows past
    # the switch), then under the long one.
    model_dir, _ = phi3
    base = prompts()[5][:12]
    batch = [[*base, 1, 2], [*base, *range(40, 50)], [*base, *range(40, 50), 3]]
    expected = transformers_tokens(model_dir, batch)
    llm = LLM(model=str(model_dir), device="cpu", block_size=4)
    short = llm.generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))[0]
    assert list(short.outputs[0].token_ids) == expected[0][:2]
    outputs = [llm.generate([prompt], GREEDY)[0] for prompt in batch[1:]]
    assert [list(out.outputs[0].token_ids) for out in outputs] == expected[1:]
    # The second (long) shares no block with the first (short); the third shares the second's.
    assert outputs[0].num_cached_tokens == 0
    assert outputs[1].num_cached_tokens == 20


def _scheduler(**changes: Any) -> Scheduler:
    config = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, block_size=4, num_blocks=64)
    return Scheduler(SchedulerConfig(**{**config, **changes}))  # type: ignore[arg-type]


def _run(scheduler: Scheduler, token: int = 5) -> list[Any]:
    """One step, every sampled token `token`; returns the step's new-request data."""
    from batchlm.core.step_io import ModelRunnerOutput

    scheduled = scheduler.schedule()
    ids = tuple(chunk.request_id for chunk in scheduled.chunks if chunk.sample)
    scheduler.update_from_output(scheduled, ModelRunnerOutput(ids, (token,) * len(ids), (None,) * len(ids)))
    return list(scheduled.new_requests)


def test_the_scheduler_recomputes_a_sequence_once_as_it_crosses() -> None:
    scheduler = _scheduler(long_rope_after=ORIGINAL)
    scheduler.add_request(make_request("crosses", list(range(1, 13)), max_tokens=8))
    scheduler.add_request(make_request("long", list(range(1, 21)), max_tokens=8))
    new = _run(scheduler)
    assert [(data.request_id, data.long_rope) for data in new] == [("crosses", False), ("long", True)]
    resent = []
    for _ in range(12):
        resent += [(data.request_id, data.long_rope, len(data.output_token_ids)) for data in _run(scheduler)]
    # Tokens at positions 12..15 were computed short; the 17th token sends it back, long, once.
    assert resent == [("crosses", True, 5)]
    assert scheduler.stats().num_preemptions == 0
    assert not scheduler.has_unfinished_requests()


def test_without_a_switch_nothing_is_recomputed() -> None:
    scheduler = _scheduler()
    scheduler.add_request(make_request("a", list(range(1, 13)), max_tokens=20))
    assert len(_run(scheduler)) == 1
    for _ in range(19):
        assert _run(scheduler) == []
    assert not scheduler.has_unfinished_requests()


def test_a_sibling_crossing_keeps_its_place_in_the_batch() -> None:
    # One sequence of an n = 2 request runs beside "a"; "b" waits, ahead of the request's next turn.
    # Its switch to the long rotation gives up no turn: it comes back before "b".
    import dataclasses

    scheduler = _scheduler(long_rope_after=ORIGINAL, max_num_seqs=2)
    for index in range(2):
        request = make_request(f"g-{index}", list(range(1, 13)), max_tokens=8)
        scheduler.add_request(dataclasses.replace(request, group_id="g"))
    for request_id in ("a", "b"):
        scheduler.add_request(make_request(request_id, [1, 2, 3, 4], max_tokens=11))
    admitted = []
    for _ in range(8):
        admitted += [(data.request_id, data.long_rope) for data in _run(scheduler)]
    assert admitted == [("g-0", False), ("a", False), ("g-0", True)]
