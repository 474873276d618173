"""Per-group reward statistics: what "vanishing advantage" looks like in numbers."""

from __future__ import annotations

import torch
from torch import Tensor


def fill_missing(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Replace NaN rewards (no reward applied) by their group's mean of the rest.

    rewards [B*G] -> (filled [B*G], missing [B*G] bool). A filled value equals its
    group mean, so its advantage is 0; a group with no value at all becomes 0s.
    """
    grouped = rewards.view(-1, group_size)  # [B, G]
    missing = grouped.isnan()  # [B, G]
    present = (~missing).sum(-1, keepdim=True)  # [B, 1]
    mean = grouped.nan_to_num(0.0).sum(-1, keepdim=True) / present.clamp(min=1)  # [B, 1]
    filled = torch.where(missing, mean.expand_as(grouped), grouped)  # [B, G]
    return filled.reshape(-1), missing.reshape(-1)


def group_stats(prefix: str, values: Tensor, group_size: int) -> dict[str, float]:
    """Mean and std over all values, and the share of groups with zero spread.

    NaN entries (not applicable) are ignored; a group with fewer than two values
    counts as zero-spread (it gives no learning signal either).
    """
    grouped = values.float().view(-1, group_size)  # [B, G]
    valid = ~grouped.isnan()  # [B, G]
    flat = grouped[valid]  # [N]
    applicable = float(valid.float().mean())
    if flat.numel() == 0:  # no mean to report: say so rather than log a NaN
        return {f"{prefix}/applicable_frac": 0.0, f"{prefix}/zero_std_frac": 1.0}
    high = grouped.masked_fill(~valid, float("-inf")).amax(-1)  # [B]
    low = grouped.masked_fill(~valid, float("inf")).amin(-1)  # [B]
    flat_groups = (valid.sum(-1) < 2) | (high == low)  # [B]
    return {
        f"{prefix}/mean": float(flat.mean()),
        f"{prefix}/std": float(flat.std(unbiased=False)),
        f"{prefix}/zero_std_frac": float(flat_groups.float().mean()),
        f"{prefix}/applicable_frac": applicable,
    }
