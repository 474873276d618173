import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pebr_lightning.algorithms.losses import policy_loss
from pebr_lightning.algorithms.reductions import (
    ConstantLength,
    GlobalTokenMean,
    SequenceMean,
    TokenMean,
)

LN2 = math.log(2.0)
LN4 = math.log(4.0)
REPO = Path(__file__).resolve().parents[2]


def _leaf(rows):
    return torch.tensor(rows, requires_grad=True)


def _metric(metrics, key):
    return metrics[key].item()


def test_token_clip_low_and_high_hand_values():
    """old_logp = 0, so logp is the log-ratio. eps_low = eps_high = 0.2: clip to [0.8, 1.2].

    Both sequences have ratios r = [1, 2, 0.5].
    Seq 0, A = +1: min(r A, clip(r) A) = min([1, 2, 0.5], [1, 1.2, 0.8]) = [1, 1.2, 0.5]
      -> loss [-1, -1.2, -0.5]; token 1 is clipped high (r = 2 > 1.2, A > 0).
    Seq 1, A = -1: min([-1, -2, -0.5], [-1, -1.2, -0.8]) = [-1, -2, -0.8]
      -> loss [1, 2, 0.8]; token 2 is clipped low (r = 0.5 < 0.8, A < 0).
    bnpo: (-2.7 + 3.8) / 6 = 1.1 / 6.
    Gradient of -r A wrt logp is -r A (dr/dlogp = r) where unclipped, 0 where clipped:
      [[-1, 0, -0.5], [1, 2, 0]] / 6.
    Metrics: clip_frac/low = clip_frac/high = 1/6; ratio mean 7/6, min 0.5, max 2.
    """
    logp = _leaf([[0.0, LN2, -LN2], [0.0, LN2, -LN2]])
    loss, metrics = policy_loss(
        logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3), reduction=TokenMean()
    )
    assert math.isclose(loss.item(), 1.1 / 6, rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.0, -0.5], [1.0, 2.0, 0.0]]) / 6)
    assert math.isclose(_metric(metrics, "clip_frac/low"), 1 / 6, rel_tol=1e-6)
    assert math.isclose(_metric(metrics, "clip_frac/high"), 1 / 6, rel_tol=1e-6)
    assert _metric(metrics, "clip_frac/dual") == 0.0
    assert _metric(metrics, "kl") == 0.0
    assert math.isclose(_metric(metrics, "ratio/mean"), 7 / 6, rel_tol=1e-6)
    assert math.isclose(_metric(metrics, "ratio/min"), 0.5, rel_tol=1e-6)
    assert math.isclose(_metric(metrics, "ratio/max"), 2.0, rel_tol=1e-6)
    assert all(not v.requires_grad for v in metrics.values())


def test_asymmetric_clip_uses_eps_high_above():
    """eps_high = 1.5 (clip to [0.8, 2.5]): r = 2 with A = +1 is no longer clipped.

    Seq 0 of the previous test becomes loss [-1, -2, -0.5]; seq 1 is unchanged
    [1, 2, 0.8]. bnpo: (-3.5 + 3.8) / 6 = 0.05; clip_frac/high 0.
    """
    logp = torch.tensor([[0.0, LN2, -LN2], [0.0, LN2, -LN2]])
    loss, metrics = policy_loss(
        logp,
        torch.zeros(2, 3),
        torch.tensor([1.0, -1.0]),
        torch.ones(2, 3),
        eps_high=1.5,
        reduction=TokenMean(),
    )
    assert math.isclose(loss.item(), 0.05, rel_tol=1e-5)
    assert _metric(metrics, "clip_frac/high") == 0.0
    assert math.isclose(_metric(metrics, "clip_frac/low"), 1 / 6, rel_tol=1e-6)


def test_dual_clip_active_and_inactive():
    """Both sequences have r = [4, 2, 1]; c = 3, clip to [0.8, 1.2].

    Seq 0, A = +1: min([4, 2, 1], [1.2, 1.2, 1]) = [1.2, 1.2, 1] -> loss [-1.2, -1.2, -1];
      the dual clip never touches A > 0 even though r = 4 > c. Gradient [0, 0, -1].
    Seq 1, A = -1: min([-4, -2, -1], [-1.2, -1.2, -1]) = [-4, -2, -1]; the objective
      max(J, c A) = max(J, -3) = [-3, -2, -1] -> loss [3, 2, 1]. The cap is active on
      token 0 only (r = 4 > c) and zeroes its gradient: [0, 2, 1]; inactive on
      token 1 (r = 2 < c), whose gradient stays -r A = 2.
    bnpo with the cap: (-3.4 + 6) / 6 = 2.6 / 6; without: (-3.4 + 7) / 6 = 0.6.
    clip_frac/dual = 1/6, clip_frac/high = 2/6.
    """
    logp = _leaf([[LN4, LN2, 0.0], [LN4, LN2, 0.0]])
    inputs = (logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    loss, metrics = policy_loss(*inputs, dual_clip=3.0, reduction=TokenMean())
    assert math.isclose(loss.item(), 2.6 / 6, rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -1.0], [0.0, 2.0, 1.0]]) / 6)
    assert math.isclose(_metric(metrics, "clip_frac/dual"), 1 / 6, rel_tol=1e-6)
    assert math.isclose(_metric(metrics, "clip_frac/high"), 2 / 6, rel_tol=1e-6)

    logp.grad = None
    loss, metrics = policy_loss(*inputs, reduction=TokenMean())
    assert math.isclose(loss.item(), 0.6, rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -1.0], [4.0, 2.0, 1.0]]) / 6)
    assert _metric(metrics, "clip_frac/dual") == 0.0


def test_dual_clip_above_every_ratio_changes_nothing():
    """c = 5 > max r = 4: no cap is active, so the loss equals the uncapped 0.6."""
    logp = torch.tensor([[LN4, LN2, 0.0], [LN4, LN2, 0.0]])
    inputs = (logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    loss, metrics = policy_loss(*inputs, dual_clip=5.0, reduction=TokenMean())
    assert math.isclose(loss.item(), 0.6, rel_tol=1e-6)
    assert _metric(metrics, "clip_frac/dual") == 0.0


def test_k3_kl_hand_values():
    """logp = old_logp and A = 0, so the policy term is 0 and only beta * k3 remains.

    k3 = exp(d) - d - 1 with d = ref - logp:
      d = ln 2  -> 2 - ln 2 - 1 = 1 - ln 2
      d = 0     -> 0
      d = -ln 2 -> 1/2 + ln 2 - 1 = ln 2 - 1/2
    d = [[ln 2, 0, -ln 2], [0, 0, 0]]: sum of k3 = 1/2, mean over 6 tokens (kl metric) 1/12,
    bnpo loss with beta = 0.5: 1/24.
    dk3/dlogp = -(exp(d) - 1) = 1 - exp(d): [-1, 0, 1/2] on seq 0, times beta / 6:
      [[-1/12, 0, 1/24], [0, 0, 0]].
    """
    logp = _leaf([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[LN2, 0.0, -LN2], [0.0, 0.0, 0.0]])
    loss, metrics = policy_loss(
        logp,
        torch.zeros(2, 3),
        torch.zeros(2),
        torch.ones(2, 3),
        ref_logp=ref,
        beta=0.5,
        reduction=TokenMean(),
    )
    assert math.isclose(loss.item(), 1 / 24, rel_tol=1e-6)
    assert math.isclose(_metric(metrics, "kl"), 1 / 12, rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(
        logp.grad, torch.tensor([[-1 / 12, 0.0, 1 / 24], [0.0, 0.0, 0.0]]), atol=1e-7, rtol=1e-6
    )


def test_kl_is_off_at_beta_zero_and_needs_ref():
    """beta = 0 ignores ref_logp: loss 0 (A = 0, r = 1) and kl metric 0. beta > 0 needs ref."""
    logp = torch.zeros(2, 3)
    ref = torch.full((2, 3), LN2)
    loss, metrics = policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 3), ref_logp=ref)
    assert loss.item() == 0.0
    assert _metric(metrics, "kl") == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 3), beta=0.1)


def _padded_batch():
    """r = 1 on every valid token (logp = old_logp), so each token's loss is -A.

    Seq 0: A = +1, 3 valid tokens -> losses [-1, -1, -1].
    Seq 1: A = -2, 1 valid token  -> loss [2]; its padding holds values that would make
      inf / NaN (r = exp(2000), a NaN logp) if they leaked in.
    """
    logp = _leaf([[-1.0, -2.0, -3.0], [-1.0, 1000.0, float("nan")]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1000.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return logp, old, torch.tensor([1.0, -2.0]), mask


@pytest.mark.parametrize(
    ("reduction", "expected", "kwargs"),
    [
        # mean of the sequence means: (-3/3 + 2/1) / 2 = 0.5
        (SequenceMean(), 0.5, {}),
        # sum over the 4 valid tokens: (-3 + 2) / 4 = -0.25
        (TokenMean(), -0.25, {}),
        # sum / (2 sequences x 4 max tokens) = -1 / 8
        (ConstantLength(), -0.125, {"max_completion_length": 4}),
        # one process: the same as the token mean
        (GlobalTokenMean(), -0.25, {}),
        # 10 valid tokens over 2 processes: local sum -1 / 10 x 2 = -0.2
        (GlobalTokenMean(), -0.2, {"num_valid_tokens_global": 10, "world_size": 2}),
    ],
)
def test_reductions_with_padding(reduction, expected, kwargs):
    """See _padded_batch for the per-token losses; the expected values are in the params.

    Gradient: at r = 1, d(-r A)/dlogp = -A on valid tokens, 0 on padding; bnpo divides by
    the 4 valid tokens: [[-1/4, -1/4, -1/4], [2/4, 0, 0]].
    """
    logp, old, adv, mask = _padded_batch()
    loss, metrics = policy_loss(logp, old, adv, mask, reduction=reduction, **kwargs)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1, 1:].eq(0).all()
    if isinstance(reduction, TokenMean):
        torch.testing.assert_close(
            logp.grad, torch.tensor([[-0.25, -0.25, -0.25], [0.5, 0.0, 0.0]])
        )
    assert _metric(metrics, "ratio/max") == 1.0
    assert _metric(metrics, "ratio/min") == 1.0
    assert _metric(metrics, "clip_frac/high") == 0.0


def test_padding_is_excluded_from_clip_fractions():
    """Seq 0 (A = +1) has r = 2 on its one valid token and r = 4 on two padded tokens:
    clip_frac/high counts 1 of the 2 valid tokens -> 0.5 (not 3/4 or 3/6); ratio max 2.
    Seq 1 (A = -1), r = 1 on its one valid token.
    """
    logp = torch.tensor([[LN2, LN4, LN4], [0.0, LN4, LN4]])
    mask = torch.tensor([[True, False, False], [True, False, False]])
    _, metrics = policy_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask)
    assert _metric(metrics, "clip_frac/high") == 0.5
    assert math.isclose(_metric(metrics, "ratio/max"), 2.0, rel_tol=1e-6)
    assert math.isclose(_metric(metrics, "ratio/mean"), 1.5, rel_tol=1e-6)


def test_grpo_leaves_empty_sequences_out_of_the_mean():
    """The padded batch plus a third sequence with no valid token.

    grpo: still (-1 + 2) / 2 = 0.5 (the empty sequence is not counted; /3 would give 1/3).
    dr_grpo: the denominator counts every sequence: -1 / (3 x 4) = -1/12.
    """
    logp, old, adv, mask = _padded_batch()
    logp = torch.cat([logp.detach(), torch.zeros(1, 3)])
    old = torch.cat([old, torch.zeros(1, 3)])
    adv = torch.cat([adv, torch.tensor([5.0])])
    mask = torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)])
    loss, _ = policy_loss(logp, old, adv, mask, reduction=SequenceMean())
    assert math.isclose(loss.item(), 0.5, rel_tol=1e-6)
    loss, _ = policy_loss(logp, old, adv, mask, reduction=ConstantLength(), max_completion_length=4)
    assert math.isclose(loss.item(), -1 / 12, rel_tol=1e-6)


def test_batch_without_valid_tokens_gives_zero_loss_that_backpropagates():
    logp = torch.zeros(2, 3, requires_grad=True)
    for reduction in (SequenceMean(), TokenMean(), GlobalTokenMean()):
        loss, metrics = policy_loss(
            logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), reduction=reduction
        )
        loss.backward()
        assert loss.item() == 0.0
        assert logp.grad.eq(0).all()
        assert _metric(metrics, "ratio/mean") == 1.0


def _gspo_batch():
    """Log-ratios (old_logp = 0). Seq 0: [ln 4, 0, padding 100], mask [1, 1, 0];
    seq 1: [ln 2, -ln 2, 0]. Advantages [+1, -1]."""
    logp = _leaf([[LN4, 0.0, 100.0], [LN2, -LN2, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask


def test_sequence_importance_hand_values():
    """GSPO, eps_high = 1.5 (clip to [0.8, 2.5]), grpo reduction.

    Seq 0: mean log-ratio (ln 4 + 0) / 2 = ln 2 -> r = 2 on both valid tokens, A = +1,
      unclipped: loss -2 per token, sequence mean -2.
    Seq 1: mean (ln 2 - ln 2 + 0) / 3 = 0 -> r = 1, A = -1: loss 1, sequence mean 1.
    Loss (-2 + 1) / 2 = -0.5.
    Gradient: dr/dlogp_t = r / n for each valid token, so d(-r A)/dlogp_t = -A r / n,
      then / 2 sequences: seq 0: -1 * 2 / 2 / 2 = -0.5; seq 1: 1 * 1 / 3 / 2 = 1/6.
    Ratio metrics over the 5 valid tokens [2, 2, 1, 1, 1]: mean 1.4, min 1, max 2.

    Token level on the same batch: seq 0 r = [4, 1] -> min([4, 1], [2.5, 1]) -> loss
    [-2.5, -1], mean -1.75; seq 1 r = [2, 0.5, 1], A = -1 -> min([-2, -0.5, -1],
    [-2, -0.8, -1]) -> loss [2, 0.8, 1], mean 3.8/3; loss (-1.75 + 3.8/3) / 2 = -0.241666...
    """
    logp, old, adv, mask = _gspo_batch()
    loss, metrics = policy_loss(logp, old, adv, mask, eps_high=1.5, importance_level="sequence")
    assert math.isclose(loss.item(), -0.5, rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5, 0.0], [1 / 6, 1 / 6, 1 / 6]]))
    assert math.isclose(_metric(metrics, "ratio/mean"), 1.4, rel_tol=1e-6)
    assert math.isclose(_metric(metrics, "ratio/min"), 1.0, rel_tol=1e-6)
    assert math.isclose(_metric(metrics, "ratio/max"), 2.0, rel_tol=1e-6)

    token_loss, _ = policy_loss(logp, old, adv, mask, eps_high=1.5, importance_level="token")
    assert math.isclose(token_loss.item(), (-1.75 + 3.8 / 3) / 2, rel_tol=1e-6)


def test_sequence_importance_clips_the_whole_sequence():
    """eps_high = 0.2: seq 0's shared r = 2 > 1.2 with A = +1 is clipped on both valid
    tokens (loss -1.2 each, zero gradient); clip_frac/high = 2 of 5 valid tokens.
    Loss (-1.2 + 1) / 2 = -0.1.
    """
    logp, old, adv, mask = _gspo_batch()
    loss, metrics = policy_loss(logp, old, adv, mask, importance_level="sequence")
    assert math.isclose(loss.item(), -0.1, rel_tol=1e-5)
    loss.backward()
    assert logp.grad[0].eq(0).all()
    assert math.isclose(_metric(metrics, "clip_frac/high"), 0.4, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"old_logp": torch.zeros(2, 4)}, "old_logp"),
        ({"mask": torch.ones(3, 3)}, "mask"),
        ({"ref_logp": torch.zeros(2, 2)}, "ref_logp"),
        ({"advantages": torch.zeros(2, 1)}, "advantages"),
        ({"logp": torch.zeros(6)}, "logp"),
        ({"importance_level": "segment"}, "importance_level"),
        ({"reduction": ConstantLength()}, "max_completion_length"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"eps_low": 1.0}, "eps_low"),
        ({"beta": -0.1}, "beta"),
    ],
)
def test_invalid_arguments_are_rejected(change, match):
    args = {
        "logp": torch.zeros(2, 3),
        "old_logp": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "mask": torch.ones(2, 3),
    }
    args.update(change)
    positional = [args.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=match):
        policy_loss(*positional, **args)


def _dapo_shards():
    """Rank 0 holds 2 sequences with 5 valid tokens, rank 1 one sequence with 1 token."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=generator) * 0.3
    old = torch.randn(3, 4, generator=generator) * 0.3
    adv = torch.tensor([1.0, -1.5, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    return [(x[:2], old[:2], adv[:2], mask[:2]), (x[2:], old[2:], adv[2:], mask[2:])]


def _theta_grad(shard, reduction):
    """logp = x + theta with theta [T] shared by every sequence: a stand-in for weights."""
    x, old, adv, mask = shard
    theta = torch.zeros(x.shape[1], requires_grad=True)
    loss, _ = policy_loss(x + theta, old, adv, mask, reduction=reduction, dual_clip=3.0)
    loss.backward()
    return theta.grad


def _dapo_rank(rank, init_file):
    """One process's step: dapo loss and backward, then DDP's average of the gradients."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        grad = _theta_grad(_dapo_shards()[rank], GlobalTokenMean())
        dist.all_reduce(grad)
        return grad / dist.get_world_size()
    finally:
        dist.destroy_process_group()


_RANK_1 = (
    "import importlib.util, sys;"
    "spec = importlib.util.spec_from_file_location('dapo_worker', sys.argv[1]);"
    "module = importlib.util.module_from_spec(spec);"
    "spec.loader.exec_module(module);"
    "module._dapo_rank(1, sys.argv[2])"
)


def test_dapo_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    """Two gloo processes: this one is rank 0, a fresh interpreter is rank 1.

    The DDP-averaged gradient of the per-process dapo losses (token count all-reduced,
    world size read from the process group) must equal the gradient of one process's
    token mean (bnpo) over all 3 sequences. Averaging per-process token means instead
    would weight rank 1's lone token 5x too much, which the first assert shows differs.
    """
    shards = _dapo_shards()
    whole = tuple(torch.cat(parts) for parts in zip(*shards, strict=True))
    expected = _theta_grad(whole, TokenMean())
    naive = (_theta_grad(shards[0], TokenMean()) + _theta_grad(shards[1], TokenMean())) / 2
    assert not torch.allclose(naive, expected, atol=1e-4)

    init_file = tmp_path / "init"
    rank_1 = subprocess.Popen(
        [sys.executable, "-c", _RANK_1, __file__, str(init_file)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        averaged = _dapo_rank(0, init_file)
    finally:
        output, _ = rank_1.communicate(timeout=60)
    assert rank_1.returncode == 0, output
    assert not dist.is_initialized()
    torch.testing.assert_close(averaged, expected)
