"""Per-group reward handling before advantages: rewards that did not apply."""

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
