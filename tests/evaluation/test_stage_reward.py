"""A stage's reward on fixed questions (evaluation/stage_reward.py)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.engines import HFEngine, complete_records
from pebr_lightning.evaluation.stage_reward import (
    paired_difference,
    reference_reward,
    sampled_reward,
)
from pebr_lightning.models.policy import build_policy
from pebr_lightning.models.rollout import SamplingConfig
from pebr_lightning.rewards.combine import load_rewards
from pebr_lightning.rewards.format import FormatReward

# length over a 6-token budget: random 12-token text scores differently draw by draw
REWARDS = [
    {"name": "format", "weight": 0.5},
    {"name": "length", "weight": 0.5, "init_args": {"max_tokens": 6}},
]


def test_paired_difference_by_hand():
    # differences 0.1, 0.0, 0.2: mean 0.1, sample stdev 0.1, standard error 0.1 / sqrt(3)
    diff, se = paired_difference([0.5, 0.6, 0.7], [0.6, 0.6, 0.9])
    assert diff == pytest.approx(0.1)
    assert se == pytest.approx(0.1 / math.sqrt(3))
    with pytest.raises(ValueError, match="two equal lists"):
        paired_difference([0.5, 0.6], [0.6])


@pytest.fixture(scope="module")
def tiny(tiny_path):
    built = build_policy(str(tiny_path))
    return built.model.eval().requires_grad_(False), built.processor


def test_each_question_gets_the_mean_total_of_its_own_completions(tiny, shapes_data):
    """Recomputed here by decoding with the same seed and scoring text by text."""
    policy, processor = tiny
    records = load_manifest(shapes_data["val"]).records[:3]
    sampling = SamplingConfig(group_size=4, temperature=1.0, max_new_tokens=12)
    result = sampled_reward(
        policy, processor, records, load_rewards(REWARDS), sampling, seed=5, batch_size=2
    )

    engine = HFEngine(processor)
    engine.sync_weights(policy)
    texts = [
        t
        for _, chunk in complete_records(engine, processor, records, sampling, batch_size=2, seed=5)
        for t in chunk
    ]
    fmt = FormatReward()(completions=texts, samples=[r for r in records for _ in range(4)])
    length = (
        load_rewards([REWARDS[1]])
        .rewards[0]
        .reward(
            completions=texts,
            samples=[r for r in records for _ in range(4)],
            tokenizer=processor.tokenizer,
        )
    )
    totals = [0.5 * f + 0.5 * n for f, n in zip(fmt, length, strict=True)]
    expected = [statistics.fmean(totals[i * 4 : (i + 1) * 4]) for i in range(3)]
    assert result.per_question == pytest.approx(expected)
    assert result.per_reward["format"] == pytest.approx(statistics.fmean(fmt))
    assert result.mean == pytest.approx(statistics.fmean(expected))


def test_the_same_seed_draws_the_same_completions_and_another_seed_others(tiny, shapes_data):
    policy, processor = tiny
    records = load_manifest(shapes_data["val"]).records[:4]
    rewards = load_rewards(REWARDS)
    sampling = SamplingConfig(group_size=4, temperature=1.0, max_new_tokens=12)
    once = sampled_reward(policy, processor, records, rewards, sampling, seed=1)
    again = sampled_reward(policy, processor, records, rewards, sampling, seed=1)
    other = sampled_reward(policy, processor, records, rewards, sampling, seed=2)
    assert once.per_question == again.per_question
    assert once.per_question != other.per_question


def test_reference_responses_are_the_ceiling_of_format(tiny, shapes_data):
    policy, processor = tiny
    records = load_manifest(shapes_data["val"]).records[:5]
    rewards = load_rewards([{"name": "format", "weight": 1.0}])
    ceiling = reference_reward(records, rewards, processor)
    assert ceiling.per_question == [1.0] * 5
    random_model = sampled_reward(
        policy,
        processor,
        records,
        rewards,
        SamplingConfig(group_size=2, temperature=1.0, max_new_tokens=12),
    )
    assert random_model.mean < 0.5  # random-init text is not in the PeBR format
    assert torch.tensor(random_model.per_question).le(1.0).all()
