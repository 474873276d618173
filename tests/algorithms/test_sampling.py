import math

import torch

from pebr_lightning.algorithms.sampling import filter_logits, sample_tokens


def test_top_p_keeps_the_smallest_nucleus():
    """Probabilities [0.5, 0.3, 0.15, 0.05] (logits = their logs).

    top_p 0.7: mass before each token = [0, 0.5, 0.8, 0.95] -> keep the first two.
    top_p 0.5: mass before = [0, 0.5, ...] -> 0.5 >= 0.5 drops token 1 -> keep one.
    """
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_logits(logits, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_p=0.5).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_top_p_respects_vocabulary_order():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()  # same distribution, shuffled
    assert filter_logits(logits, top_p=0.7).isfinite().tolist() == [[False, True, False, True]]


def test_top_k():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert filter_logits(logits, top_k=2).isfinite().tolist() == [[False, True, True, False]]


def test_sampled_logprob_is_the_temperature_scaled_one():
    """Logits [0, ln 3] at temperature 1 -> p = [1/4, 3/4]; at T=2 -> [0, ln 3 / 2]."""
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(4, 1)
    gen = torch.Generator().manual_seed(0)
    tokens, logp = sample_tokens(logits, temperature=1.0, generator=gen)
    expected = torch.where(tokens == 1, math.log(0.75), math.log(0.25))
    torch.testing.assert_close(logp, expected)
    tokens, logp = sample_tokens(logits, temperature=2.0, generator=gen)
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    expected = torch.where(tokens == 1, math.log(p1), math.log(1 - p1))
    torch.testing.assert_close(logp, expected.float())


def test_zero_temperature_is_greedy():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]])
    tokens, _ = sample_tokens(logits, temperature=0.0)
    assert tokens.tolist() == [1, 0]


def test_banned_tokens_are_never_drawn_but_keep_their_mass():
    """Logits [0, 0]: token 1 banned -> always token 0, with log-prob ln(1/2) (not 0)."""
    logits = torch.zeros(64, 2)
    tokens, logp = sample_tokens(logits, temperature=1.0, banned=torch.tensor([1]))
    assert tokens.eq(0).all()
    torch.testing.assert_close(logp, torch.full((64,), math.log(0.5)))
