"""The one-pass Triton race against torch: argmax for temperature 0, the softmax distribution otherwise,
seeds, masked and padded vocabularies, and the Sampler's fused path against its torch path."""

from __future__ import annotations

import pytest
import torch
from devices import require_cuda

pytestmark = pytest.mark.gpu
# The kernel draws with CUDA generators: Triton's CPU interpreter cannot stand in.
require_cuda()
pytest.importorskip("triton")

from batchlm.sampling import Sampler, SamplingState  # noqa: E402
from batchlm.sampling.race_kernel import race  # noqa: E402
from batchlm.sampling_params import SamplingParams  # noqa: E402

CUDA = torch.device("cuda")
# 99.9% quantile of chi-square with 5 degrees of freedom.
CHI2_CRIT_DF5 = 20.5


def test_temperature_zero_is_the_first_argmax() -> None:
    generator = torch.Generator(CUDA).manual_seed(0)
    logits = torch.randint(-3, 3, (64, 5000), device=CUDA, generator=generator).float()  # many ties
    out = race(logits, torch.zeros(64, device=CUDA), seed=123)
    assert torch.equal(out, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.8])
def test_draws_follow_the_tempered_softmax(temperature: float) -> None:
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0], device=CUDA)
    draws = 40_000
    out = race(row.repeat(draws, 1), torch.full((draws,), temperature, device=CUDA), seed=7)
    counts = torch.bincount(out, minlength=6).double()
    expected = torch.softmax(row.double() / temperature, -1) * draws
    assert float(((counts - expected) ** 2 / expected).sum()) < CHI2_CRIT_DF5


def test_masked_tokens_padding_and_row_strides() -> None:
    padded = torch.zeros(300, 3000 + 64, device=CUDA)
    padded[:, 3000:] = 1e4  # padding columns outside the view: never read
    logits = padded[:, :3000]
    logits[:, ::2] = float("-inf")
    out = race(logits, torch.ones(300, device=CUDA), seed=11)
    assert bool((out % 2 == 1).all()) and int(out.max()) < 3000
    assert len(set(out.tolist())) > 100  # uniform over 1500 allowed tokens: many distinct draws


def test_same_seed_same_draws() -> None:
    logits = torch.zeros(32, 1000, device=CUDA)
    temperature = torch.ones(32, device=CUDA)
    first = race(logits, temperature, seed=5)
    assert torch.equal(first, race(logits, temperature, seed=5))
    assert not torch.equal(first, race(logits, temperature, seed=6))


def test_sampler_fused_path_matches_torch_path_on_seeded_and_greedy_rows() -> None:
    vocab = 4096
    logits = torch.randn(12, vocab, device=CUDA, generator=torch.Generator(CUDA).manual_seed(1)) * 3

    def states() -> list[SamplingState]:
        out = []
        for row in range(12):
            params = SamplingParams(temperature=0.0 if row % 4 == 0 else 0.9, logit_bias={5: 1.0})
            seed = 100 + row if row % 2 else None
            out.append(SamplingState.create(params, seed, (1, 2), (3,), (0,), CUDA))
        return out

    before = logits.clone()
    fused = Sampler(vocab, CUDA)
    assert fused._race is not None
    reference = Sampler(vocab, CUDA)
    reference._race = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_ids, _ = fused.sample_on_device(logits, states())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference_ids, _ = reference.sample_on_device(logits, states())
    fused_list, reference_list = fused_ids.tolist(), reference_ids.tolist()
    for row in range(12):
        if row % 4 == 0 or row % 2:  # greedy rows and seeded rows do not depend on the path
            assert fused_list[row] == reference_list[row], row
    assert torch.equal(logits, before)  # not scratch: the caller's logits are left alone


def test_vocabulary_splits_do_not_change_the_draw() -> None:
    # Row 0 alone is split over many programs; inside a 300-row batch it is one program. The noise
    # of (row, column) is the same either way, so the token must be too; ties go to the first column.
    generator = torch.Generator(CUDA).manual_seed(3)
    batch = torch.randn(300, 128_256, device=CUDA, generator=generator)
    batch[:, 100_000] = batch[:, 7] = 50.0  # a tie across splits: greedy takes column 7
    temperature = torch.ones(300, device=CUDA)
    for seed in (1, 2, 3):
        alone = race(batch[:1], temperature[:1], seed=seed)
        assert alone.item() == race(batch, temperature, seed=seed)[0].item()
    greedy = torch.zeros(2, device=CUDA)
    assert race(batch[:2], greedy, seed=9).tolist() == [7, 7]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_race_as_their_float32_widening(dtype: torch.dtype) -> None:
    # The model's logits are read as they are and widened in registers: the draws are those of the
    # widened copy, greedy rows (temperature 0) included.
    generator = torch.Generator(CUDA).manual_seed(4)
    logits = (torch.randn(70, 50_001, device=CUDA, generator=generator) * 3).to(dtype)
    temperature = torch.rand(70, device=CUDA, generator=generator) * 2
    temperature[::7] = 0.0
    for seed in (1, 2):
        assert torch.equal(race(logits, temperature, seed), race(logits.float(), temperature, seed))


def test_sampler_races_half_precision_logits_without_widening_them() -> None:
    vocab = 32_000
    logits = torch.randn(16, vocab + 64, device=CUDA, generator=torch.Generator(CUDA).manual_seed(2)) * 3
    logits = logits.bfloat16()

    def states() -> list[SamplingState]:
        return [
            SamplingState.create(
                SamplingParams(temperature=0.0 if row % 5 == 0 else 0.8),
                300 + row if row % 3 == 0 else None,
                (1,),
                (),
                (0,),
                CUDA,
            )
            for row in range(16)
        ]

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        raw, _ = Sampler(vocab, CUDA, seed=5).sample_on_device(logits, states())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    widened, _ = Sampler(vocab, CUDA, seed=5).sample_on_device(logits.float(), states())
    assert torch.equal(raw, widened)
    assert int(raw.max()) < vocab  # the padding columns are never read
