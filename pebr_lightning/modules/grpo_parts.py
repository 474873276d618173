"""A GRPO step's rollout as one unit, and merging several (DAPO dynamic sampling).

Dynamic sampling replaces groups whose rewards are all equal (zero advantage, no
learning signal) with groups of fresh prompts; the groups kept from several rollouts
are merged here into one batch: prompts re-padded on the left, completions on the
right, rewards and log lines carried along row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pebr_lightning.algorithms.advantages import zero_variance_groups
from pebr_lightning.algorithms.reward_stats import fill_missing
from pebr_lightning.models.rollout import Rollout, concat_rollouts, select_groups
from pebr_lightning.rewards.combine import RewardResult


@dataclass
class Part:
    """One rollout with everything that belongs to its rows."""

    prompt: dict[str, Tensor]
    rollout: Rollout
    features: list[Tensor] | None
    scored: dict[str, Any]
    records: list[dict]
    images: list[Any]


def signal_groups(part: Part, group_size: int) -> list[int]:
    """Groups whose rewards are not all equal (the ones with a learning signal)."""
    filled, _ = fill_missing(part.scored["rewards"], group_size)
    return [
        i for i, flat in enumerate(zero_variance_groups(filled, group_size).tolist()) if not flat
    ]


def merge_parts(
    parts: list[Part], kept: list[tuple[int, int]], group_size: int, pad_id: int
) -> Part:
    """The groups `kept` ((part, group) pairs) of several rollouts as one Part.

    Groups come out in part order, and within a part in the order given.
    """
    selected, features, scores, records, images = [], [], [], [], []
    for index, part in enumerate(parts):
        groups = [grp for p, grp in kept if p == index]
        if not groups:
            continue
        selected.append(select_groups(part.prompt, part.rollout, groups))
        rows = [grp * group_size + j for grp in groups for j in range(group_size)]
        if part.features is not None:
            features.extend(part.features[grp] for grp in groups)
        scores.append((part.scored, rows))
        records += [part.records[grp] for grp in groups]
        images += [part.images[grp] for grp in groups]
    prompt, rollout = concat_rollouts(selected, pad_id)
    results = [(sc["result"], rows) for sc, rows in scores]
    result = RewardResult(
        total=[r.total[i] for r, rows in results for i in rows],
        per_reward={
            name: [r.per_reward[name][i] for r, rows in results for i in rows]
            for name in results[0][0].per_reward
        },
        components={
            name: [r.components[name][i] for r, rows in results for i in rows]
            for name in results[0][0].components
        },
        faults={
            name: sum(r.faults.get(name, 0) for r, _ in results) for name in results[0][0].faults
        },
    )
    scored = {
        "rewards": torch.cat([sc["rewards"][rows] for sc, rows in scores]),
        "result": result,
        "texts": [sc["texts"][i] for sc, rows in scores for i in rows],
    }
    has_features = all(p.features is not None for p in parts)
    return Part(prompt, rollout, features if has_features else None, scored, records, images)
