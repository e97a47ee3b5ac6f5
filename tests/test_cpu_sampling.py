"""The CPU sampling kernel (kernels/cpu_sampling.py): inverse-CDF draws against float64 cumulative sums,
the distribution, filtered (-inf) tokens, temperature, and the sampler's use of it."""

from __future__ import annotations

import pytest
import torch

from batchlm.kernels.cpu_sampling import sample_library, sample_rows, supports

needs_kernel = pytest.mark.skipif(sample_library() is None, reason="no AVX2 CPU or C compiler here")
GEN = torch.Generator().manual_seed(0)


def _expected(
    logits: torch.Tensor, temperature: float, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """First token whose float64 cumulative probability passes u, and how close u is to a boundary."""
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(dim=-1)
    index = (
        torch.searchsorted(cdf, uniforms.unsqueeze(1), right=True).squeeze(1).clamp_max(logits.shape[1] - 1)
    )
    margin = (cdf - uniforms.unsqueeze(1)).abs().min(dim=1).values
    return index, margin


@needs_kernel
@pytest.mark.parametrize("vocab", [1, 7, 256, 257, 49152])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_draws_are_the_inverse_cdf(vocab: int, temperature: float) -> None:
    rows = 64
    logits = 4 * torch.randn(1, vocab, generator=GEN).expand(rows, vocab).contiguous()
    uniforms = torch.rand(rows, dtype=torch.float64, generator=GEN)
    out = sample_rows(logits, torch.full((rows,), temperature), uniforms)
    expected, margin = _expected(logits[0:1].expand(rows, vocab), temperature, uniforms)
    close_call = margin < 1e-5  # float32 exp vs float64 softmax may disagree only at a boundary
    assert torch.equal(out[~close_call], expected[~close_call])


@needs_kernel
def test_distribution_matches_softmax() -> None:
    vocab, draws = 600, 40000
    logits = torch.randn(vocab, generator=GEN)
    out = sample_rows(
        logits.expand(draws, vocab), torch.ones(draws), torch.rand(draws, dtype=torch.float64, generator=GEN)
    )
    frequency = torch.bincount(out, minlength=vocab).double() / draws
    probs = torch.softmax(logits.double(), dim=0)
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert ((frequency - probs).abs() <= 5 * sigma + 1e-4).all()


@needs_kernel
def test_filtered_tokens_are_never_drawn_and_greedy_rows_take_the_argmax() -> None:
    rows, vocab = 200, 3000
    logits = torch.randn(rows, vocab, generator=GEN)
    keep = torch.rand(rows, vocab, generator=GEN) < 0.01
    keep[:, 0] = True
    filtered = logits.masked_fill(~keep, float("-inf"))
    extremes = torch.cat([torch.zeros(rows // 2), torch.full((rows - rows // 2,), 1 - 2**-53)]).double()
    for uniforms in (torch.rand(rows, dtype=torch.float64, generator=GEN), extremes):
        out = sample_rows(filtered, torch.ones(rows), uniforms)
        assert keep.gather(1, out.unsqueeze(1)).all()
    greedy = sample_rows(logits, torch.zeros(rows), torch.rand(rows, dtype=torch.float64, generator=GEN))
    assert torch.equal(greedy, logits.argmax(dim=1))


@needs_kernel
def test_temperature_scales_the_logits() -> None:
    logits = torch.randn(50, 1000, generator=GEN)
    uniforms = torch.rand(50, dtype=torch.float64, generator=GEN)
    tempered = sample_rows(logits, torch.full((50,), 0.5), uniforms)
    doubled = sample_rows(logits * 2, torch.ones(50), uniforms)
    assert (tempered == doubled).float().mean() > 0.95  # equal but for float rounding at boundaries


@needs_kernel
def test_strided_rows_and_empty_batch() -> None:
    wide = torch.randn(5, 300, generator=GEN)
    uniforms = torch.rand(5, dtype=torch.float64, generator=GEN)
    view = wide[:, :200]
    assert torch.equal(
        sample_rows(view, torch.ones(5), uniforms), sample_rows(view.contiguous(), torch.ones(5), uniforms)
    )
    assert sample_rows(wide[:0], torch.ones(0), uniforms[:0]).shape == (0,)
    with pytest.raises(ValueError, match="must be"):
        sample_rows(wide, torch.ones(4), uniforms)


def test_supports_only_float32_matrices_on_the_cpu() -> None:
    assert not supports(torch.zeros(2, 8, dtype=torch.bfloat16))
    assert not supports(torch.zeros(8))
