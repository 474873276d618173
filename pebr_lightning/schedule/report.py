"""The schedule's closing table, from the stages' own logs and held-out evaluations.

Start and end of a training metric are means over the first and last 10% of its
logged steps (at least one step each): single steps of RL rewards are too noisy
to compare. Each stage's training metric is the one it optimises: the SFT loss, the
whole perception reward, and the accuracy reward of reasoning (its format term is
near 1 from the start). The reward curves are drawn by schedule/curves.py.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from pebr_lightning.schedule.curves import stage_metrics

TRAIN_METRIC = {
    "sft": "train/loss",
    "perception": "reward/total/mean",
    "reasoning": "reward/accuracy/mean",
}
HELDOUT = (
    ("accuracy", "greedy"),
    ("sampled_accuracy", "sampled T=1"),
    ("pass@8", "pass@8"),
    ("perception/count", "desc. count"),
    ("perception/colours", "desc. colours"),
    ("perception/shapes", "desc. shapes right"),
    ("perception/shapes_ordered", "desc. shapes in order"),
    ("accuracy/desc_right", r"acc. \| desc. right"),
    ("accuracy/desc_wrong", r"acc. \| desc. wrong"),
)
"""Held-out figures of each stage's evaluation (evaluation/greedy.py), with their column
titles: greedy accuracy, mean accuracy of 8 sampled answers and pass@8; the share of
greedy descriptions with the right shape count, colour multiset and (colour, kind)
multiset, and the (colour, kind) pairs in their order; and greedy accuracy given a
right and given a wrong description (the "|" of "acc. | desc. right" is escaped: a
bare one would split the Markdown cell). Stage 1 should raise the share of right
descriptions, Stage 2 the accuracy given one (pebr_demo/evaluation/perception.py,
`decomposition_metrics`)."""


def metric_series(stage_dir: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of one metric across every run version of a stage, by step; a
    resumed run's steps replace the interrupted run's from where they overlap, and
    steps without a finite value are left out (schedule/curves.py reads the logs)."""
    return stage_metrics(stage_dir).get(name, [])


def start_end(series: list[tuple[int, float]]) -> tuple[float, float]:
    """Mean of the first and of the last 10% of the values (NaN when empty)."""
    if not series:
        return math.nan, math.nan
    values = [v for _, v in series]
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def majority_baseline(records: list[dict]) -> float:
    """Accuracy of always giving each question type's most common answer.

    The floor a trained model must beat: on the shapes set it is far above uniform
    guessing (e.g. "no" answers half the left-of questions).
    """
    if not records:
        return math.nan
    answers: dict[str, Counter] = {}
    for record in records:
        answers.setdefault(record.get("type") or "all", Counter())[record["answer"]] += 1
    return sum(c.most_common(1)[0][1] for c in answers.values()) / len(records)


def summary_rows(out: Path, done: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per finished training stage: its training metric at start and end, and
    every held-out figure of its evaluation (`eval` of its DONE record, all keys kept,
    per-type accuracies included)."""
    rows = []
    for name, metric in TRAIN_METRIC.items():
        if name not in done:
            continue
        start, end = start_end(metric_series(out / name, metric))
        evaluation = done[name].get("eval") or {}
        rows.append(
            {
                "stage": name,
                "metric": metric,
                "start": start,
                "end": end,
                "heldout_accuracy": evaluation.get("accuracy", math.nan),
                "heldout": {k: float(v) for k, v in evaluation.items()},
            }
        )
    return rows


def number(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.3f}"


def format_table(rows: list[dict[str, Any]], baseline: float | None = None) -> str:
    """A Markdown table (readable as plain text too); held-out columns a stage's
    evaluation did not measure show a dash."""
    titles = " | ".join(title for _, title in HELDOUT)
    lines = [
        f"| stage | training metric | start | end | {titles} |",
        "|---|---|---|---|" + "---|" * len(HELDOUT),
    ]
    for r in rows:
        heldout = r.get("heldout") or {"accuracy": r["heldout_accuracy"]}
        cells = " | ".join(number(heldout.get(key)) for key, _ in HELDOUT)
        lines.append(
            f"| {r['stage']} | {r['metric']} | {number(r['start'])} | {number(r['end'])}"
            f" | {cells} |"
        )
    if baseline is not None:
        blanks = " |" * (len(HELDOUT) - 1)
        lines.append(f"| (majority answer per type) | | | | {number(baseline)} |{blanks}")
    return "\n".join(lines)
