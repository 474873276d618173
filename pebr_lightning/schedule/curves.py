"""The schedule's reward-curve picture (OUT/rewards.png), drawn with matplotlib.

One panel per RL stage that has a folder under OUT: every reward component the
stage logged (found in its Lightning CSV header, so a new reward shows up without
touching this file), the total reward, and the KL to the reference policy on a
second y axis. Per-step values are faint dots, the same colour's line is their
moving average: single RL steps are too noisy to read a trend from.

Only `matplotlib.figure.Figure` with an explicit Agg canvas is used, never pyplot:
pyplot keeps global state and may pick an interactive backend, neither of which
belongs in a process that also trains.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pebr_lightning.files import write_atomic_with

RL_STAGES = ("perception", "reasoning")
TOTAL = "reward/total/mean"
KL = "train/kl"
Series = list[tuple[int, float]]
Panels = dict[str, dict[str, Series]]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: item i is the mean of values[i - window + 1 : i + 1].

    The first window - 1 items average over the values there are so far, so the
    line starts at the first point instead of window - 1 steps late. A window of 1
    (or less) returns the values unchanged. Values are expected finite.
    """
    window = max(1, window)
    smoothed, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        smoothed.append(total / min(i + 1, window))
    return smoothed


def smoothing_window(points: int) -> int:
    """Moving-average window for a series of `points` logged steps: 5, growing to
    50 for long runs so the line stays readable (about 1/20 of the run)."""
    return min(50, max(5, points // 20))


def stage_metrics(stage_dir: Path) -> dict[str, Series]:
    """Every metric of a stage's Lightning CSV logs: name -> [(step, value)] by step.

    Run versions are read in order, so a resumed run's steps replace the
    interrupted run's from where they overlap. Empty cells (a metric not logged on
    that row) and NaN (no process had a value, e.g. a reward not applicable to any
    sample) are left out.
    """
    by_name: dict[str, dict[int, float]] = {}
    versions = sorted(
        stage_dir.glob("lightning_logs/version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
    for path in versions:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("step") in (None, ""):
                    continue
                step = int(row["step"])
                for name, cell in row.items():
                    if name not in ("step", "epoch") and cell not in (None, ""):
                        value = float(cell)
                        if math.isfinite(value):
                            by_name.setdefault(name, {})[step] = value
    return {name: sorted(steps.items()) for name, steps in by_name.items()}


def panel_metrics(metrics: dict[str, Series]) -> dict[str, Series]:
    """The curves one RL panel shows: total reward, then each reward component's
    mean by name, then the KL; metrics with no values are dropped."""
    components = sorted(
        name
        for name in metrics
        if name.startswith("reward/") and name.endswith("/mean") and name != TOTAL
    )
    names = [TOTAL, *components, KL]
    return {name: metrics[name] for name in names if metrics.get(name)}


def curve_panels(out: Path) -> Panels:
    """Stage -> metric name -> [(step, value)] for every RL stage with a folder in OUT.

    A stage whose folder exists but has no logs yet maps to an empty dict (drawn
    as an empty panel saying so). This is exactly what `plot_curves` draws.
    """
    return {
        stage: panel_metrics(stage_metrics(out / stage))
        for stage in RL_STAGES
        if (out / stage).is_dir()
    }


def label(name: str) -> str:
    """Legend text of a metric: the reward's name, or "KL to reference" for the KL."""
    if name == KL:
        return "KL to reference"
    return name.removeprefix("reward/").removesuffix("/mean")


def _draw_series(
    axes: Axes, series: Series, colour: str, text: str, window: int, style: str = "-"
) -> None:
    steps = [s for s, _ in series]
    values = [v for _, v in series]
    axes.scatter(steps, values, s=6, color=colour, alpha=0.25, linewidths=0)
    # the total is what the stage optimises: make it stand out from its parts
    width = 2.4 if text == "total" else 1.5
    smoothed = moving_average(values, window)
    axes.plot(steps, smoothed, style, color=colour, linewidth=width, label=text)


def draw_panel(axes: Axes, stage: str, curves: dict[str, Series]) -> None:
    """One stage's rewards (left axis) and KL (right axis) on `axes`."""
    axes.set_xlabel("training step")
    axes.set_ylabel("reward")
    if not curves:
        axes.set_title(f"{stage} RL")
        axes.text(0.5, 0.5, "no metrics logged yet", ha="center", transform=axes.transAxes)
        return
    window = smoothing_window(max(len(series) for series in curves.values()))
    axes.set_title(f"{stage} RL (dots: per step; lines: moving average of {window} steps)")
    rewards = [name for name in curves if name != KL]
    for i, name in enumerate(rewards):
        _draw_series(axes, curves[name], f"C{i}", label(name), window)
    handles, texts = axes.get_legend_handles_labels()
    if KL in curves:
        # KL is orders of magnitude below the rewards: it needs its own scale
        kl_axes = axes.twinx()
        kl_axes.set_ylabel("KL")
        # dashed: tells the curve read on the right axis from the rewards
        _draw_series(kl_axes, curves[KL], "0.35", label(KL), window, style="--")
        kl_handles, kl_texts = kl_axes.get_legend_handles_labels()
        handles, texts = handles + kl_handles, texts + kl_texts
        # the legend goes on the top axes, or the KL curve would be drawn over it
        axes = kl_axes
    axes.legend(handles, texts, loc="best", fontsize="small", framealpha=0.8)


def curve_figure(panels: Panels) -> Figure:
    """A figure with one panel per stage of `panels`, side by side, on an Agg canvas."""
    figure = Figure(figsize=(6.5 * len(panels), 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for i, (stage, curves) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), i + 1)
        axes.grid(True, alpha=0.3)
        draw_panel(axes, stage, curves)
    return figure


def save_png(figure: Figure, path: Path) -> None:
    """Write `figure` to `path` as PNG; a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # write_atomic_with creates the file as open() would (umask), not mkstemp's 0600
    write_atomic_with(path, lambda f: figure.savefig(f, format="png"))


def plot_curves(out: Path, path: Path) -> Path | None:
    """PNG of the RL stages' reward and KL curves at `path`; None (and no file)
    when OUT has no RL stage folder."""
    panels = curve_panels(out)
    if not panels:
        return None
    save_png(curve_figure(panels), path)
    return path
