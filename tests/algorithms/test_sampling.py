import math

import pytest
import torch

from pebr_lightning.algorithms import sampling
from pebr_lightning.algorithms.sampling import (
    KeyedGumbel,
    filter_logits,
    hash_to_unit,
    keyed_uniform,
    mix32,
    sample_tokens,
)


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


def test_mix32_matches_the_reference_hash():
    """lowbias32 computed with Python's unbounded ints, masked to 32 bits."""

    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
    assert mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]


@pytest.mark.parametrize("c", [0x7FEB352D, 0x846CA68B, 0x9E3779B9])
def test_the_one_multiply_product_mod_2_32_is_the_exact_one(c):
    """The wrapped int64 product (used where the device wraps) against Python's
    unbounded ints and the overflow-free split, on values whose products pass 2**63."""
    assert sampling._wrapping_multiply("cpu")  # so _mul32 takes the one-multiply path
    x = torch.cat([torch.randint(0, 2**32, (10_000,)), torch.tensor([0, 1, 2**31, 2**32 - 1])])
    exact = torch.tensor([(v * c) & 0xFFFFFFFF for v in x.tolist()])
    assert torch.equal(sampling._mul32(x, c), exact)
    assert torch.equal(sampling._mul32_split(x, c), exact)


def test_keyed_uniform_depends_only_on_key_step_and_token():
    keys = torch.tensor([7, 8, 9])
    u = keyed_uniform(keys, step=3, vocab=50)  # [3, 50]
    assert u.shape == (3, 50) and (u > 0).all() and (u < 1).all()
    torch.testing.assert_close(keyed_uniform(keys[1:2], 3, 50), u[1:2])  # batch-independent
    assert not torch.equal(keyed_uniform(keys, 4, 50), u)  # another step, other noise
    assert not torch.equal(u[0], u[1])  # another key, other noise


def test_keyed_uniform_is_the_documented_hash_chain():
    """u = ((mix(mix(mix(key) ^ mix(step)) ^ mix(token * 0x9E3779B9)) >> 8) + 0.5) / 2**24,
    every product modulo 2**32, worked out in plain Python for a few entries."""

    def mix(x: int) -> int:
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    keys, step, vocab = [5, 0xDEADBEEF], 11, 40
    u = keyed_uniform(torch.tensor(keys), step, vocab)  # [2, 40]
    for i, key in enumerate(keys):
        for token in (0, 1, 39):
            row = mix(mix(key) ^ mix(step))
            bits = mix(row ^ mix(token * 0x9E3779B9))
            assert u[i, token].item() == pytest.approx(((bits >> 8) + 0.5) / 2**24, abs=2**-24)


def test_hash_to_unit_keeps_zero_and_one_out():
    """The largest hash once rounded to 1.0 in float32 (Gumbel noise +inf)."""
    u = hash_to_unit(torch.tensor([0, 255, 0xFFFFFF00, 0xFFFFFFFF]))
    assert (u > 0).all() and (u < 1).all()
    assert u[0] == u[1] == 0.5 / 2**24
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_keyed_gumbel_blocks_give_the_per_step_noise():
    """Made 3 steps at a time (a budget of 3 steps), read in and out of order, up to
    the last step: the same noise as one keyed_uniform call per step."""
    keys, vocab = torch.tensor([3, 4]), 16
    budget = 3 * 8 * keys.numel() * vocab
    noise = KeyedGumbel(keys, vocab, steps=7, budget_bytes=budget)
    assert noise.block == 3
    for step in (0, 1, 2, 3, 1, 6, 5):
        expected = -torch.log(-torch.log(keyed_uniform(keys, step, vocab)))
        torch.testing.assert_close(noise(step), expected, rtol=0, atol=0)
    assert len(noise._noise) == 2  # the block at step 5 stops at the last step, 6


def test_keyed_sampling_draws_from_the_distribution():
    """Probabilities [0.5, 0.3, 0.15, 0.05]; 40k keys: each share within 0.01 (binomial
    std <= 0.0025) of its probability."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40_000
    tokens, logp = sample_tokens(probs.log().repeat(n, 1), keys=torch.arange(n), step=1)
    shares = torch.bincount(tokens, minlength=4) / n
    torch.testing.assert_close(shares, probs, atol=0.01, rtol=0)
    torch.testing.assert_close(logp, probs.log()[tokens])


def test_keyed_sampling_respects_filters_and_is_reproducible():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(500, 1)
    keys = torch.arange(500)
    tokens, _ = sample_tokens(logits, top_p=0.7, keys=keys, step=0)
    assert set(tokens.tolist()) == {0, 1}  # the nucleus of 0.7 holds the first two
    tokens, _ = sample_tokens(logits, banned=torch.tensor([0]), keys=keys, step=0)
    assert 0 not in tokens.tolist()
    again, _ = sample_tokens(logits[:7], banned=torch.tensor([0]), keys=keys[:7], step=0)
    assert torch.equal(again, tokens[:7])
