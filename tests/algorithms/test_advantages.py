import math

import pytest
import torch

from pebr_lightning.algorithms.advantages import (
    AdvantageEstimator,
    BatchNormalized,
    GroupCentred,
    GroupNormalized,
    LeaveOneOut,
    group_advantages,
    leave_one_out_advantages,
    step_advantages,
    zero_variance_groups,
)


def test_group_scale_hand_values():
    """G = 3, two groups, eps = 0 so the values are exact.

    Group [1, 2, 3]: mean 2, centred [-1, 0, 1], unbiased std sqrt((1 + 0 + 1) / 2) = 1
      -> [-1, 0, 1].
    Group [0, 0, 3]: mean 1, centred [-1, -1, 2], unbiased std sqrt((1 + 1 + 4) / 2) = sqrt 3
      -> [-1, -1, 2] / sqrt 3.
    """
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    adv = group_advantages(rewards, group_size=3, scale="group", eps=0.0)
    s3 = math.sqrt(3.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, -1 / s3, -1 / s3, 2 / s3]))


def test_eps_is_added_to_the_std():
    """Group [0, 1, 2]: centred [-1, 0, 1], std 1; eps = 1 divides by 2 -> [-0.5, 0, 0.5]."""
    adv = group_advantages(torch.tensor([0.0, 1.0, 2.0]), group_size=3, eps=1.0)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.0, 0.5]))


def test_batch_scale_hand_values():
    """G = 2. Group [0, 2]: centred [-1, 1]. Group [1, 1]: constant, so exactly 0.

    The batch [0, 2, 1, 1] has mean 1, squared deviations [1, 1, 0, 0], unbiased
    variance 2 / 3, std sqrt(2/3); -1 / sqrt(2/3) = -sqrt(3/2).
    (Group scaling would have given std sqrt 2 and -1 / sqrt 2 instead.)
    """
    rewards = torch.tensor([0.0, 2.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=2, scale="batch", eps=0.0)
    s = math.sqrt(1.5)
    torch.testing.assert_close(adv, torch.tensor([-s, s, 0.0, 0.0]))
    assert adv[2:].eq(0).all()


def test_none_scale_only_centres():
    """Groups [1, 2, 3] and [0, 0, 3] have means 2 and 1 -> [-1, 0, 1, -1, -1, 2]."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    adv = group_advantages(rewards, group_size=3, scale="none")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_group_is_exactly_zero(scale):
    """Three float32 0.9s: their mean rounds to 0.9 + 6e-8, so r - mean is not 0 and
    divided by eps = 1e-6 would be an advantage of about 0.06. It must be exactly 0.

    The other group [0, 0.5, 1] keeps a non-zero advantage: centred [-0.5, 0, 0.5].
    """
    rewards = torch.tensor([0.9, 0.9, 0.9, 0.0, 0.5, 1.0])
    adv = group_advantages(rewards, group_size=3, scale=scale)
    assert adv[:3].eq(0).all()
    assert adv[3] < 0 < adv[5] and adv[4] == 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_batch_is_exactly_zero(scale):
    """Every reward 0.9: batch std 0 (or ~1e-8) must not blow up: all exactly 0."""
    adv = group_advantages(torch.full((6,), 0.9), group_size=3, scale=scale)
    assert adv.eq(0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_of_one_is_zero_not_nan(scale):
    """G = 1: the unbiased std of one element is NaN in torch; a lone completion gets 0."""
    adv = group_advantages(torch.tensor([1.0, 2.0, 5.0]), group_size=1, scale=scale)
    assert adv.eq(0).all()
    assert adv.shape == (3,)


def test_integer_rewards_are_accepted():
    """Rewards 0/1 as int64: group [0, 1] centred [-0.5, 0.5], std sqrt(0.5) -> -+sqrt(0.5)."""
    adv = group_advantages(torch.tensor([0, 1]), group_size=2, eps=0.0)
    s = math.sqrt(0.5)
    torch.testing.assert_close(adv, torch.tensor([-s, s]))


def test_zero_variance_groups():
    """Groups [1, 1], [0, 1], [2, 2] -> constant, varying, constant."""
    flags = zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), group_size=2)
    assert flags.dtype == torch.bool
    assert flags.tolist() == [True, False, True]


def test_rewards_must_split_into_groups():
    with pytest.raises(ValueError, match=r"5 rewards .* group_size=2"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match=r"5 rewards .* group_size=2"):
        zero_variance_groups(torch.zeros(5), group_size=2)


def test_unknown_scale_is_rejected():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), group_size=2, scale="std")


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_rewards_near_the_float32_limit_give_finite_advantages(scale):
    """Before: the std of +-3e38 squared past float32's range, every advantage was NaN
    and every step was skipped. Hand value: rewards +-a in a group of 4 have mean 0 and
    unbiased std a * sqrt(4/3), so each advantage is +-sqrt(3/4)."""
    a = 3e38
    rewards = torch.tensor([a, -a, a, -a], dtype=torch.float32)
    advantages = group_advantages(rewards, 4, scale=scale)
    assert advantages.dtype == torch.float32
    expected = torch.tensor([1.0, -1.0, 1.0, -1.0]) * (3 / 4) ** 0.5
    torch.testing.assert_close(advantages, expected)


def test_leave_one_out_hand_values():
    """RLOO: each reward minus the mean of the group's other rewards.

    Group [3, 0, 0] (G = 3): 3 - (0 + 0) / 2 = 3; 0 - (3 + 0) / 2 = -1.5 (twice).
    Group [1, 0, 0, 1] (G = 4): 1 - 1/3 = 2/3; 0 - 2/3 = -2/3.
    Group [2, 2, 2]: all equal -> exactly 0.
    """
    torch.testing.assert_close(
        leave_one_out_advantages(torch.tensor([3.0, 0.0, 0.0, 2.0, 2.0, 2.0]), 3),
        torch.tensor([3.0, -1.5, -1.5, 0.0, 0.0, 0.0]),
    )
    torch.testing.assert_close(
        LeaveOneOut()(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4),
        torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]),
    )
    # the identity in the module docstring: G / (G - 1) times the group-centred value
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 1.0, 0.0, 0.2, 0.7])
    torch.testing.assert_close(
        leave_one_out_advantages(rewards, 4), 4 / 3 * group_advantages(rewards, 4, scale="none")
    )
    assert leave_one_out_advantages(torch.tensor([1.0, 5.0]), 1).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "estimator, scale",
    [(GroupNormalized(), "group"), (BatchNormalized(), "batch"), (GroupCentred(), "none")],
    ids=["GroupNormalized", "BatchNormalized", "GroupCentred"],
)
def test_each_estimator_class_is_its_scale(estimator, scale):
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 1.0, 0.0, 0.2, 0.7])
    assert isinstance(estimator, AdvantageEstimator)
    torch.testing.assert_close(estimator(rewards, 4), group_advantages(rewards, 4, scale=scale))


def test_step_advantages_uses_the_estimator_it_is_given_and_checks_its_shape():
    rewards = torch.tensor([1.0, 0.0, float("nan"), 1.0])  # one reward did not apply
    advantages, keep = step_advantages(rewards, 4, LeaveOneOut())
    # the missing row counts as its group's mean, 2/3: 1 - (0 + 2/3 + 1) / 3 = 4/9,
    # 0 - (1 + 2/3 + 1) / 3 = -8/9, and the filled row 2/3 - (1 + 0 + 1) / 3 = 0
    torch.testing.assert_close(advantages, torch.tensor([4 / 9, -8 / 9, 0.0, 4 / 9]))
    assert keep.tolist() == [True, True, False, True]

    class Halves:
        def __call__(self, rewards, group_size):
            return rewards[: rewards.numel() // 2]

    with pytest.raises(ValueError, match=r"Halves returned shape \(2,\) for \(4,\) rewards"):
        step_advantages(rewards, 4, Halves())
