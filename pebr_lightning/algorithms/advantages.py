"""Group-relative advantages for GRPO, and the estimators a config chooses from.

Every prompt is sampled G times; a completion's advantage is its reward minus a
baseline made of its own group's rewards, optionally divided by a standard deviation:

    GroupNormalized  A = (r - mean_group) / (std_group + eps)   GRPO (DeepSeekMath), PeBR-R1
    BatchNormalized  A = (r - mean_group) / (std_batch + eps)   std of all B*G rewards (TRL)
    GroupCentred     A =  r - mean_group                        Dr. GRPO (no std bias)
    LeaveOneOut      A =  r - mean of the other G - 1 rewards   RLOO (Ahmadian et al. 2024)
                       = G / (G - 1) * (r - mean_group)

Standard deviations are unbiased (Bessel), as in the paper's EasyR1/verl code.

An estimator is any class whose instances map rewards [B*G] and G to advantages
[B*G] (`AdvantageEstimator`); `loss.advantage` names one by class path
(algorithms/variants.py), so a new one needs no change here.

A group whose rewards are all equal carries no learning signal. Its advantages are
set to exactly 0 rather than left to floating-point luck: the mean of equal floats
need not round back to the same float, and (r - mean) / eps would turn that rounding
error into an advantage of order 1e-2. A group of one completion (G = 1) is such a
group, so G = 1 gives zeros rather than the NaN of an unbiased std over one element.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from pebr_lightning.algorithms.reward_stats import fill_missing

SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> Tensor:
    """Advantages [B*G] from rewards [B*G], each group's G completions contiguous.

    Groups with zero reward variance (see `zero_variance_groups`) get exactly 0.
    Raises ValueError when `rewards` does not split into groups of `group_size` or
    `scale` is not one of "group", "batch", "none".
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    # float64 inside: the std of float32 rewards near their limit (3e38) squares past it,
    # and a NaN advantage would skip every step; advantages come back in float32.
    grouped = _grouped(rewards, group_size).double()  # [B, G]
    flat = zero_variance_groups(rewards, group_size)  # [B]
    centred = grouped - grouped.mean(-1, keepdim=True)  # [B, G]
    if scale == "group":
        # std over one element is NaN in torch; such groups are zeroed below anyway.
        std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        centred = centred / (std + eps)  # [B, G]
    elif scale == "batch":
        std = grouped.std() if grouped.numel() > 1 else grouped.new_zeros(())
        centred = centred / (std + eps)
    advantages = centred.masked_fill(flat[:, None], 0.0)  # [B, G]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages.reshape(-1).to(out_dtype)  # [B*G]


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO advantages [B*G] from rewards [B*G]: each reward minus the mean of the other
    G - 1 rewards of its group. Zero-variance groups and G = 1 give exactly 0."""
    grouped = _grouped(rewards, group_size).double()  # [B, G]
    flat = zero_variance_groups(rewards, group_size)  # [B]
    # G = 1: every group is flat, so the 0 / 1 below is masked like the rest
    others = (grouped.sum(-1, keepdim=True) - grouped) / max(group_size - 1, 1)  # [B, G]
    advantages = (grouped - others).masked_fill(flat[:, None], 0.0)  # [B, G]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages.reshape(-1).to(out_dtype)  # [B*G]


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Maps rewards [B*G] (each group's G completions contiguous, no NaN) to advantages [B*G]."""

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor: ...


class GroupNormalized:
    """GRPO's advantage: (r - group mean) / (group std + eps). The default."""

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return group_advantages(rewards, group_size, scale="group", eps=self.eps)


class BatchNormalized:
    """(r - group mean) / (std of every reward of the batch + eps), as TRL scales."""

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return group_advantages(rewards, group_size, scale="batch", eps=self.eps)


class GroupCentred:
    """Dr. GRPO's advantage: r - group mean, not divided by a std (a lucky right answer
    in a group of wrong ones gets no extra weight)."""

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return group_advantages(rewards, group_size, scale="none")


class LeaveOneOut:
    """RLOO: r - mean of the group's other G - 1 rewards (an unbiased baseline, since
    it does not depend on the completion it is subtracted from)."""

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return leave_one_out_advantages(rewards, group_size)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """BoolTensor [B]: True where every reward of the group is equal (vanishing advantage).

    Equality is exact; a group of one completion always counts as zero-variance.
    """
    grouped = _grouped(rewards, group_size)  # [B, G]
    return (grouped == grouped[:, :1]).all(-1)  # [B]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of group_size={group_size}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, group_size)  # [B, G]


def step_advantages(
    rewards: Tensor,
    group_size: int,
    estimator: AdvantageEstimator | None = None,
    drop_zero_variance: bool = False,
) -> tuple[Tensor, Tensor]:
    """A GRPO step's advantages [B*G] and the rows that enter the loss [B*G] bool.

    rewards [B*G] may hold NaN (no reward applied): such a row is filled with its
    group's mean and left out of the loss; with `drop_zero_variance`, so are the
    groups whose rewards are all equal. `estimator` defaults to GroupNormalized.
    """
    estimator = GroupNormalized() if estimator is None else estimator
    filled, missing = fill_missing(rewards, group_size)  # [B*G], [B*G] bool
    advantages = estimator(filled, group_size)  # [B*G]
    if advantages.shape != filled.shape:
        raise ValueError(
            f"advantage estimator {type(estimator).__name__} returned shape "
            f"{tuple(advantages.shape)} for {tuple(filled.shape)} rewards"
        )
    keep = ~missing
    if drop_zero_variance:
        keep &= ~zero_variance_groups(filled, group_size).repeat_interleave(group_size)
    return advantages, keep
