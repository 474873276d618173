"""What a GRPO step logs: rewards per component, "vanishing advantage", rollout figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pebr_lightning.algorithms.reward_stats import group_stats


def step_logs(
    rollout: Any, scored: dict[str, Any], advantages: Tensor, metrics: dict[str, float]
) -> dict[str, float]:
    """Metric name -> value for one step.

    For the total and every reward: mean, std, share of groups with zero spread
    (their advantage is 0) and share of samples it applied to; reward components;
    advantage size; completion length and truncation; rollout throughput; and the
    loss metrics of the update.
    """
    g = rollout.group_size
    result = scored["result"]
    logs: dict[str, float] = dict(group_stats("reward/total", scored["rewards"], g))
    for name, values in result.per_reward.items():
        column = torch.tensor([math.nan if v is None else v for v in values])
        logs.update(group_stats(f"reward/{name}", column, g))
        logs[f"reward/{name}/faults"] = float(result.faults.get(name, 0))
    for name, values in result.components.items():
        numbers = [v for v in values if v is not None]
        if numbers:
            logs[f"component/{name}"] = sum(numbers) / len(numbers)
    lengths = rollout.completion_mask.sum(-1).float()
    logs["advantage/abs_mean"] = float(advantages.abs().mean())
    logs["completion/length_mean"] = float(lengths.mean())
    logs["completion/truncated_frac"] = float(rollout.truncated.float().mean())
    logs["rollout/tokens_per_s"] = float(lengths.sum()) / max(rollout.seconds, 1e-9)
    logs.update({f"train/{k}": v for k, v in metrics.items()})
    return logs


def write_samples(
    path: Path, step: int, rollout: Any, scored: dict[str, Any], records: list[dict]
) -> None:
    """Append the first two groups' completions with their rewards to a JSONL file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    g = rollout.group_size
    per_reward = scored["result"].per_reward
    with path.open("a", encoding="utf-8") as f:
        for row in range(min(g * 2, len(scored["texts"]))):
            total = float(scored["rewards"][row])
            line = {
                "step": step,
                "id": records[row // g]["id"],
                "completion": scored["texts"][row],
                "reward": None if math.isnan(total) else total,
                **{name: values[row] for name, values in per_reward.items()},
            }
            f.write(json.dumps(line) + "\n")
