"""The schedule's closing table and reward-curve picture, from the stages' own logs.

Start and end of a training metric are means over the first and last 10% of its
logged steps (at least one step each): single steps of RL rewards are too noisy
to compare.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

TRAIN_METRIC = {
    "sft": "train/loss",
    "perception": "reward/total/mean",
    "reasoning": "reward/total/mean",
}
CURVES = {
    "perception": ("reward/total/mean", "reward/clip_score/mean", "reward/keyword/mean"),
    "reasoning": ("reward/total/mean", "reward/accuracy/mean"),
}
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def metric_series(stage_dir: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of one metric across every run version of a stage, by step; a
    resumed run's steps replace the interrupted run's from where they overlap."""
    by_step: dict[int, float] = {}
    versions = sorted(
        stage_dir.glob("lightning_logs/version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
    for path in versions:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                value = row.get(name)
                if value not in (None, "") and row.get("step", "") != "":
                    by_step[int(row["step"])] = float(value)
    return sorted(by_step.items())


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
    """One row per finished training stage: metric, start, end, held-out accuracy."""
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
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], baseline: float | None = None) -> str:
    """A Markdown table (readable as plain text too)."""

    def number(x: float) -> str:
        return "—" if x is None or math.isnan(x) else f"{x:.3f}"

    lines = [
        "| stage | training metric | start | end | held-out accuracy (greedy) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['stage']} | {r['metric']} | {number(r['start'])} | {number(r['end'])}"
        f" | {number(r['heldout_accuracy'])} |"
        for r in rows
    ]
    if baseline is not None:
        lines.append(f"| (majority answer per type) | | | | {number(baseline)} |")
    return "\n".join(lines)


def plot_curves(out: Path, path: Path, width: int = 900, height: int = 360) -> Path | None:
    """PNG of the RL stages' reward curves (one panel per stage, moving average of 5)."""
    panels = [(s, names) for s, names in CURVES.items() if (out / s).is_dir()]
    if not panels:
        return None
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panel_w = width // len(panels)
    for i, (stage, names) in enumerate(panels):
        box = (i * panel_w + 50, 30, (i + 1) * panel_w - 15, height - 60)
        _panel(draw, box, stage, [(n, metric_series(out / stage, n)) for n in names])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _panel(draw: ImageDraw.ImageDraw, box, title: str, series) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text((left, top - 20), f"{title}: reward per step (moving average of 5)", fill="black")
    points = [(s, v) for _, data in series for s, v in data]
    if not points:
        draw.text((left + 10, top + 10), "no data", fill="black")
        return
    x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
    y0, y1 = min(v for _, v in points), max(v for _, v in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

    def at(step: float, value: float) -> tuple[float, float]:
        return (
            left + (step - x0) / (x1 - x0) * (right - left),
            bottom - (value - y0) / (y1 - y0) * (bottom - top),
        )

    for tick in (y0, (y0 + y1) / 2, y1):
        y = at(x0, tick)[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((left - 46, y - 6), f"{tick:.2f}", fill="black")
    draw.text((left, bottom + 4), f"step {x0}", fill="black")
    draw.text((right - 60, bottom + 4), f"step {x1}", fill="black")
    for n, (name, data) in enumerate(series):
        colour = COLOURS[n % len(COLOURS)]
        values = [v for _, v in data]
        smooth = [
            sum(values[max(0, j - 4) : j + 1]) / len(values[max(0, j - 4) : j + 1])
            for j in range(len(values))
        ]
        line = [at(s, v) for (s, _), v in zip(data, smooth, strict=True)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            draw.ellipse(
                (line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), fill=colour
            )
        draw.text((left + 8, bottom + 20 + 0 * n), "", fill=colour)
        draw.text((left + 8 + 150 * n, bottom + 22), name.removeprefix("reward/"), fill=colour)
