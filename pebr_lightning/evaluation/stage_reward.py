"""A stage's reward on a fixed set of questions: the same questions for every model.

The curve a GRPO stage logs is the reward of whatever questions each step drew, at
4 prompts x 8 completions a step: its first and last 10% of steps differ by the
drift of the questions as well as by learning, with a standard error of 1-2 points
on the demo. Scoring two models (say the weights a stage started from and the ones
it ended with) on the same questions, with the same sampling settings and the same
seeded draws, measures what the stage did to its own objective with a small paired
error. `reference_reward` scores the records' reference responses: what a response
the data calls right gets, the ceiling the stage climbs towards.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from pebr_lightning.data.collate import RecordDataset
from pebr_lightning.data.prompts import PromptConfig, record_response
from pebr_lightning.evaluation.greedy import batched_completions
from pebr_lightning.models.rollout import SamplingConfig
from pebr_lightning.rewards.combine import RewardResult, RewardSet, score_groups


@dataclass
class StageReward:
    """per_question: each question's mean total over its completions, in record order;
    per_reward: each reward's mean over every completion it scored (unweighted)."""

    per_question: list[float]
    per_reward: dict[str, float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_question)


def sampled_reward(
    policy: nn.Module,
    processor: Any,
    records: Sequence[dict[str, Any]],
    rewards: RewardSet,
    sampling: SamplingConfig,
    *,
    seed: int = 0,
    batch_size: int = 16,
    prompt: PromptConfig = PromptConfig(),
) -> StageReward:
    """`sampling.group_size` completions per record from `policy`, scored by `rewards`
    as a GRPO step scores them (a completion whose total is None counts 0)."""
    images = [item["images"] for item in RecordDataset(list(records))]
    g = sampling.group_size
    device = next(policy.parameters()).device
    per_question: list[float] = []
    scored: dict[str, list[float | None]] = {}
    for chunk, texts in batched_completions(
        policy, processor, records, sampling, batch_size=batch_size, prompt=prompt, seed=seed
    ):
        own = images[len(per_question) : len(per_question) + len(chunk)]  # chunks come in order
        result = score_groups(
            rewards, texts, chunk, own, g, processor, global_step=0, device=device
        )
        totals = _totals(result)
        per_question += [statistics.fmean(totals[i * g : (i + 1) * g]) for i in range(len(chunk))]
        for name, values in result.per_reward.items():
            scored.setdefault(name, []).extend(values)
    return StageReward(per_question, _means(scored))


def reference_reward(
    records: Sequence[dict[str, Any]], rewards: RewardSet, processor: Any
) -> StageReward:
    """The records' reference responses (description, rationale, steps, answer) scored."""
    images = [item["images"] for item in RecordDataset(list(records))]
    responses = [record_response(r) for r in records]
    result = score_groups(
        rewards, responses, records, images, 1, processor, global_step=0, device="cpu"
    )
    return StageReward(_totals(result), _means(result.per_reward))


def _totals(result: RewardResult) -> list[float]:
    return [0.0 if t is None else t for t in result.total]


def _means(per_reward: dict[str, list[float | None]]) -> dict[str, float]:
    """Each reward's mean over the completions it scored (None: not scored)."""
    found = {name: [v for v in values if v is not None] for name, values in per_reward.items()}
    return {name: statistics.fmean(values) for name, values in found.items() if values}


def paired_difference(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """(mean of after - before, its standard error), question by question.

    [n] and [n] -> the mean difference and stdev(differences) / sqrt(n); n >= 2.
    """
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"need two equal lists of at least 2, got {len(before)}, {len(after)}")
    diffs = [b - a for a, b in zip(before, after, strict=True)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
