"""A GRPO step's records: the scores of a rollout, and a scored rollout as one unit.

`Scores` is what the reward phase produced for B*G completions; `ScoredRollout` is a
rollout with everything that belongs to its rows (prompts, image features, scores,
records, images). Both select rows and concatenate, so DAPO's dynamic sampling,
which replaces groups whose rewards are all equal (zero advantage, no learning
signal) with groups of fresh prompts, is: keep the groups with spread of each
rollout (`select`), then `concat` them (prompts re-padded on the left, completions on
the right, every per-row field carried along).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pebr_lightning.algorithms.advantages import zero_variance_groups
from pebr_lightning.algorithms.reward_stats import fill_missing
from pebr_lightning.algorithms.sections import section_mask
from pebr_lightning.data.prompts import RATIONALE_HEADER
from pebr_lightning.models.families import ModelFamily
from pebr_lightning.models.rollout import Rollout, concat_rollouts, select_groups
from pebr_lightning.rewards.combine import RewardResult


@dataclass
class Scores:
    """The reward phase's output for N completions."""

    rewards: Tensor
    """[N] weighted totals; NaN where no reward applied."""
    result: RewardResult
    """Each reward's scores and components, and fault counts."""
    texts: list[str]
    """[N] the decoded completions that were scored."""

    def select(self, rows: Sequence[int]) -> Scores:
        index = torch.tensor(list(rows), dtype=torch.long, device=self.rewards.device)
        return Scores(self.rewards[index], self.result.select(rows), [self.texts[i] for i in rows])

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        return Scores(
            torch.cat([p.rewards for p in parts]),
            RewardResult.concat([p.result for p in parts]),
            [t for p in parts for t in p.texts],
        )


@dataclass
class ScoredRollout:
    """B prompts, their B*G completions (group members contiguous) and everything that
    belongs to those rows."""

    prompt: dict[str, Tensor]
    rollout: Rollout
    features: list[Tensor] | None
    """[B] image features for the log-prob passes to reuse; None: they encode again."""
    scores: Scores
    records: list[dict]
    """[B] manifest records."""
    images: list[list[Any]]
    """[B] each prompt's decoded images, in order."""
    family: ModelFamily
    """The policy's model family: how the prompt's images split and join."""

    @property
    def group_size(self) -> int:
        return self.rollout.group_size

    def signal_groups(self) -> list[int]:
        """Groups whose rewards are not all equal (the ones with a learning signal)."""
        filled, _ = fill_missing(self.scores.rewards, self.group_size)
        flat = zero_variance_groups(filled, self.group_size).tolist()
        return [i for i, equal in enumerate(flat) if not equal]

    def select(self, groups: Sequence[int]) -> ScoredRollout:
        """These groups (prompts with their G completions each), in this order."""
        g = self.group_size
        prompt, rollout = select_groups(self.family, self.prompt, self.rollout, list(groups))
        return ScoredRollout(
            prompt,
            rollout,
            None if self.features is None else [self.features[i] for i in groups],
            self.scores.select([i * g + j for i in groups for j in range(g)]),
            [self.records[i] for i in groups],
            [self.images[i] for i in groups],
            self.family,
        )

    @staticmethod
    def concat(parts: Sequence[ScoredRollout], pad_id: int) -> ScoredRollout:
        """One batch from several, in order; features only when every part has them."""
        family = parts[0].family
        prompt, rollout = concat_rollouts(family, [(p.prompt, p.rollout) for p in parts], pad_id)
        shared = all(p.features is not None for p in parts)
        return ScoredRollout(
            prompt,
            rollout,
            [f for p in parts for f in p.features] if shared else None,
            Scores.concat([p.scores for p in parts]),
            [r for p in parts for r in p.records],
            [im for p in parts for im in p.images],
            family,
        )


def fill_groups(
    part: ScoredRollout,
    tries: int,
    draw: Callable[[int, int], ScoredRollout],
    anywhere: Callable[[bool], bool] = bool,
    pad_id: int = 0,
) -> tuple[ScoredRollout, int, float]:
    """DAPO's dynamic sampling: `part`'s groups with reward spread, topped up with
    groups of fresh prompts until there are as many as `part` has prompts, or `tries`
    extra rollouts were made. draw(attempt, want) rolls out and scores `want` fresh
    prompts. anywhere(short): whether any process is still short (sharded, every
    process must roll out as often as the neediest one; a process already full draws
    one prompt and ignores it). Returns (the groups kept, in part order and within a
    part in the order kept; `part` itself when none had spread), extra rollouts made,
    share of the batch filled."""
    b = len(part.records)
    parts, kept, used = [part], [(0, i) for i in part.signal_groups()], 0
    while used < tries and anywhere(len(kept) < b):
        used += 1
        parts.append(draw(used, max(b - len(kept), 1)))
        kept += [(len(parts) - 1, i) for i in parts[-1].signal_groups()]
    share = min(len(kept), b) / b
    if not kept:
        return part, used, share
    kept = kept[:b]
    selected = [
        p.select([grp for index, grp in kept if index == i])
        for i, p in enumerate(parts)
        if any(index == i for index, _ in kept)
    ]
    return ScoredRollout.concat(selected, pad_id), used, share


def trained_rollout(tokenizer: Any, rollout: Rollout, section: str) -> Rollout:
    """The rollout whose completion_mask covers only the tokens `section` trains
    (GRPOLossConfig.trained_section); the original when it is "all". Only the loss
    reads this mask: log-prob passes keep attending to the whole completion."""
    if section == "all":
        return rollout
    ids = rollout.completion_ids.tolist()  # [B*G][T]
    pieces = [tokenizer.batch_decode([[t] for t in row]) for row in ids]
    side = "before" if section == "description" else "after"
    mask = section_mask(pieces, rollout.completion_mask, RATIONALE_HEADER, side)  # [B*G, T]
    return dataclasses.replace(rollout, completion_mask=mask)
