"""Importance weights for an engine that samples from another policy: hand values for
each mode, and the property they exist for: with samples drawn from the engine's q,
the weighted policy gradient estimates the gradient under the trainer's pi."""

from __future__ import annotations

import math

import pytest
import torch

from pebr_lightning.algorithms.engine_correction import engine_weights
from pebr_lightning.algorithms.losses import policy_loss
from pebr_lightning.algorithms.reductions import TokenMean

LN2, LN3 = math.log(2.0), math.log(3.0)
# two completions of 3 tokens; the second has 2 tokens and padding holding -inf
OLD = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -math.inf]])
ENGINE = torch.tensor([[-LN2, LN2, -LN3], [-LN2, 0.0, 5.0]])  # log pi_old/q = ln2, -ln2, ln3
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_token_modes_hand_values():
    # token weights: 2, 0.5, 3 | 2, 1, (pad)
    w, m = engine_weights(OLD, ENGINE, MASK, "token_truncate", cap=2.5)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 2.5], [2.0, 1.0, 0.0]]))
    assert m["engine_is/capped_frac"].item() == pytest.approx(1 / 5)
    assert m["engine_is/mean"].item() == pytest.approx((2 + 0.5 + 2.5 + 2 + 1) / 5)
    w, m = engine_weights(OLD, ENGINE, MASK, "token_mask", cap=2.5)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 0.0], [2.0, 1.0, 0.0]]))
    assert m["engine_is/capped_frac"].item() == pytest.approx(1 / 5)


def test_sequence_modes_hand_values():
    # sequence products: 2 * 0.5 * 3 = 3 | 2 * 1 = 2 (padding left out)
    w, m = engine_weights(OLD, ENGINE, MASK, "sequence_truncate", cap=2.5)
    torch.testing.assert_close(w, torch.tensor([[2.5, 2.5, 2.5], [2.0, 2.0, 0.0]]))
    assert m["engine_is/capped_frac"].item() == pytest.approx(3 / 5)
    w, _ = engine_weights(OLD, ENGINE, MASK, "sequence_mask", cap=2.5)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 0.0]]))
    # a product far beyond float range is capped, not inf or NaN
    huge = torch.full((1, 400), 1.0), torch.zeros(1, 400), torch.ones(1, 400)
    w, _ = engine_weights(*huge, "sequence_truncate", cap=2.0)
    assert torch.equal(w, torch.full((1, 400), 2.0))


def test_none_gives_no_weights_and_bad_settings_are_refused():
    assert engine_weights(OLD, ENGINE, MASK, "none", cap=2.0) == (None, {})
    with pytest.raises(ValueError, match="must be one of"):
        engine_weights(OLD, ENGINE, MASK, "token", cap=2.0)
    with pytest.raises(ValueError, match="cap must be > 0"):
        engine_weights(OLD, ENGINE, MASK, "token_truncate", cap=0.0)


def test_weights_scale_the_policy_gradient_term_not_the_kl_term():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    weights = torch.tensor([[2.0, 0.5]])
    kwargs = {"ref_logp": ref, "beta": 0.1, "reduction": TokenMean()}
    plain, _ = policy_loss(logp, logp.detach(), adv, mask, **kwargs)
    weighted, _ = policy_loss(logp, logp.detach(), adv, mask, engine_weights=weights, **kwargs)
    # at ratio 1 the token term is -A; k3 is the same in both
    kl = (ref - logp.detach()).exp() - (ref - logp.detach()) - 1
    torch.testing.assert_close(plain, (-1.0 + 0.1 * kl).mean())
    torch.testing.assert_close(weighted, ((-torch.tensor([2.0, 0.5])) + 0.1 * kl[0]).mean())
    with pytest.raises(ValueError, match="engine_weights has shape"):
        policy_loss(logp, logp.detach(), adv, mask, engine_weights=torch.ones(2, 2))


def weighted_gradient(mode: str, samples: int = 40_000, cap: float = 100.0) -> torch.Tensor:
    """The policy gradient a GRPO step estimates on a one-token "completion" over 4
    tokens, sampled from an engine whose q differs from the trainer's pi."""
    logits = torch.tensor([0.5, -0.3, 1.0, 0.0], requires_grad=True)
    q = torch.tensor([0.55, 0.25, 0.1, 0.1])  # the engine's distribution, far from pi
    reward = torch.tensor([1.0, 0.0, 2.0, -1.0])
    tokens = torch.multinomial(
        q, samples, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    logp = torch.log_softmax(logits, -1)[tokens][:, None]  # [N, 1]
    mask = torch.ones(samples, 1)
    weights, _ = engine_weights(logp, q.log()[tokens][:, None], mask, mode, cap)
    loss, _ = policy_loss(
        logp, logp.detach(), reward[tokens], mask, reduction=TokenMean(), engine_weights=weights
    )
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def exact_gradient() -> torch.Tensor:
    """-d/dlogits of E_pi[reward], the gradient the loss should estimate."""
    logits = torch.tensor([0.5, -0.3, 1.0, 0.0], requires_grad=True)
    reward = torch.tensor([1.0, 0.0, 2.0, -1.0])
    (grad,) = torch.autograd.grad(-(torch.softmax(logits, -1) * reward).sum(), logits)
    return grad


def test_the_weighted_gradient_is_the_gradient_under_the_trainers_policy():
    exact = exact_gradient()
    corrected = weighted_gradient("token_truncate")  # cap above every weight here
    torch.testing.assert_close(corrected, exact, atol=0.02, rtol=0.0)
    # uncorrected, the step follows the engine's sampling distribution instead
    assert (weighted_gradient("none") - exact).abs().max() > 0.1
