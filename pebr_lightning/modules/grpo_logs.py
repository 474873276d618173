"""What a GRPO step logs: rewards per component, "vanishing advantage", rollout figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pebr_lightning.metrics.step import StepMetrics
from pebr_lightning.models.rollout import Rollout
from pebr_lightning.modules.grpo_parts import ScoredRollout, Scores


def record_step(
    stats: StepMetrics,
    rollout: Rollout,
    scores: Scores,
    advantages: Tensor,
    metrics: dict,
    phases: dict[str, dict] | None = None,
) -> None:
    """Add one step's figures on this process to `stats` (reduced globally later).

    For the total and every reward: mean, std, share of groups with zero spread
    (their advantage is 0) and share of samples it applied to; reward components;
    advantage size; completion length and truncation; rollout throughput (all
    processes' tokens over the slowest process's time); and the update's loss metrics.
    """
    result = scores.result
    n = float(len(scores.texts))
    stats.group("reward/total", scores.rewards)
    for name, values in result.per_reward.items():
        stats.group(f"reward/{name}", torch.tensor([math.nan if v is None else v for v in values]))
        stats.total(f"reward/{name}/faults", float(result.faults.get(name, 0)))
    for name, values in result.components.items():
        numbers = [v for v in values if v is not None]
        if numbers:
            stats.mean(f"component/{name}", sum(numbers) / len(numbers), len(numbers))
    lengths = rollout.completion_mask.sum(-1).float()
    stats.mean("advantage/abs_mean", float(advantages.abs().mean()), n)
    stats.mean("completion/length_mean", float(lengths.mean()), n)
    stats.mean("completion/truncated_frac", float(rollout.truncated.float().mean()), n)
    stats.total("rollout/tokens", float(lengths.sum()))
    stats.max("rollout/seconds", rollout.seconds)
    for key, value in metrics.items():
        stats.mean(f"train/{key}", value, n)
    for name, figures in (phases or {}).items():  # PhaseMeter.results: time and peak memory
        stats.max(f"time/{name}_s", figures["seconds"])
        if figures["peak_bytes"] is not None:
            stats.max(f"memory/{name}_peak_gib", figures["peak_bytes"] / 2**30)


def step_logs(stats: StepMetrics) -> dict[str, float]:
    """Metric name -> value, reduced over all processes (a collective call)."""
    logs = stats.compute()
    seconds = logs.pop("rollout/seconds", 0.0)
    logs["rollout/tokens_per_s"] = logs.pop("rollout/tokens", 0.0) / max(seconds, 1e-9)
    return logs


def sample_rows(step: int, part: ScoredRollout) -> list[dict[str, Any]]:
    """The first two groups' completions with their rewards, one dict per completion."""
    g = part.group_size
    scores = part.scores
    rows = []
    for row in range(min(g * 2, len(scores.texts))):
        total = float(scores.rewards[row])
        rows.append(
            {
                "step": step,
                "id": part.records[row // g]["id"],
                "completion": scores.texts[row],
                "reward": None if math.isnan(total) else total,
                **{name: values[row] for name, values in scores.result.per_reward.items()},
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table (TensorBoard's text tab renders it)."""
    if not rows:
        return ""
    columns = [c for c in rows[0] if c != "step"]

    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_samples(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append sample rows to a JSONL file, one line per completion."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for line in rows:
            f.write(json.dumps(line) + "\n")


def publish_samples(rows: list[dict[str, Any]], folder: Path, loggers: list, step: int) -> None:
    """Append a step's sample rows to `folder`/samples.jsonl and to TensorBoard's text tab."""
    from lightning.pytorch.loggers import TensorBoardLogger

    write_samples(folder / "samples.jsonl", rows)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("samples", markdown_table(rows), step)
