"""The compact decode's sampler (`hf_decode.sample_tokens`): the CPU draws against
torch.multinomial and the distribution, the inverse CDF's edges, and top-p."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("shape", [(1, 2), (7, 33), (128, 501), (300, 1000)])
def test_cpu_sampler_draws_what_torch_multinomial_draws(shape):
    """The vectorized CPU draw gives torch.multinomial's token for every row over 50 steps
    of peaked and flat distributions, and leaves the generator where multinomial does."""
    import torch

    from backtrack.engines.hf_decode import multinomial_one_cpu

    ours, theirs = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    logits = torch.Generator().manual_seed(len(shape) + shape[1])
    for step in range(50):
        scale = 8.0 if step % 2 else 0.5
        probs = (torch.randn(shape, generator=logits) * scale).softmax(-1)
        expected = torch.multinomial(probs, 1, generator=theirs).squeeze(1)
        assert torch.equal(multinomial_one_cpu(probs, ours), expected)
    assert torch.equal(torch.rand(8, generator=ours), torch.rand(8, generator=theirs))


def test_inverse_cdf_draw_follows_the_distribution():
    """Over 40,000 rows of one distribution with zero-probability tokens at both ends and
    between, each token is drawn at its probability (within 5 standard errors), a zero one
    never; the same generator seed gives the same draws, and one uniform per row is drawn."""
    import torch

    from backtrack.engines.hf_decode import inverse_cdf_draw

    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0]).repeat(40_000, 1)
    generator = torch.Generator().manual_seed(3)
    drawn = inverse_cdf_draw(probs, generator)
    counts = torch.bincount(drawn, minlength=7).double() / len(drawn)
    standard_error = (probs[0].double() * (1 - probs[0].double()) / len(drawn)).sqrt()
    assert counts[[0, 2, 6]].sum() == 0
    assert ((counts - probs[0].double()).abs() <= 5 * standard_error + 1e-12).all(), counts
    again = torch.Generator().manual_seed(3)
    assert torch.equal(inverse_cdf_draw(probs, again), drawn)
    after = torch.Generator().manual_seed(3)
    torch.rand((40_000, 1), dtype=torch.float64, generator=after)
    assert torch.equal(torch.rand(4, generator=again), torch.rand(4, generator=after))


def test_inverse_cdf_draw_never_draws_past_the_last_token_with_mass(monkeypatch):
    """A uniform at its largest value (1 - 2^-53, scaled to a total that may round up) still
    lands on the last token with probability, not on the zero ones after it nor past the
    vocabulary; a uniform of 0 lands on the first token with probability."""
    import torch

    from backtrack.engines import hf_decode

    probs = torch.tensor([[0.0, 0.25, 0.75, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0],
                          [1 / 3, 1 / 3, 1 / 3, 0.0, 0.0]])
    largest = torch.tensor(1.0, dtype=torch.float64).nextafter(torch.tensor(0.0,
                                                                            dtype=torch.float64))
    for uniform, expected in ((largest, [2, 2, 2]), (0.0, [1, 2, 0])):
        monkeypatch.setattr(torch, "rand", lambda shape, dtype, generator, u=uniform:
                            torch.full(shape, float(u), dtype=dtype))
        assert hf_decode.inverse_cdf_draw(probs, None).tolist() == expected


def test_top_p_keeps_the_smallest_set_above_p():
    import torch

    from backtrack.engines.hf_decode import sample_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(2000, 1))
    generator = torch.Generator().manual_seed(0)
    drawn = sample_tokens(logits.clone(), 1.0, 0.7, generator, [])
    assert set(drawn.tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7; 2 and 3 never drawn
    assert 0.55 < (drawn == 0).float().mean() < 0.70  # 0.5 / 0.8 renormalised
    assert set(sample_tokens(logits.clone(), 1.0, 1.0, generator, [0]).tolist()) == {1, 2, 3}
    assert sample_tokens(logits[:1].clone(), 0, 1.0, generator, []).tolist() == [0]
