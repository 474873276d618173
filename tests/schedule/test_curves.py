"""`pebr schedule`'s reward-curve picture: what each panel holds, the smoothing, the PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from pebr_lightning.schedule.curves import (
    curve_figure,
    curve_panels,
    moving_average,
    plot_curves,
    smoothing_window,
)

PERCEPTION_REWARDS = ("clip_score", "keyword", "format", "length")
# Columns an RL stage logs that are not curves of the picture.
OTHER = ("reward/clip_score/faults", "reward/total/std", "component/iou", "train/loss")


def write_metrics(stage_dir: Path, version: int, rows: list[dict[str, object]]) -> None:
    """A metrics.csv as Lightning's CSVLogger writes it: one header with every column
    ever logged, a cell left empty where a row did not log that metric."""
    columns = ["epoch", "step", *sorted({k for row in rows for k in row} - {"epoch", "step"})]
    path = stage_dir / "lightning_logs" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows({"epoch": 0, **row} for row in rows)


def perception_row(step: int, scale: float = 1.0) -> dict[str, object]:
    row: dict[str, object] = {"step": step, "reward/total/mean": scale * step}
    for i, name in enumerate(PERCEPTION_REWARDS):
        row[f"reward/{name}/mean"] = scale * (step + i) / 10
    row["train/kl"] = 0.001 * step
    row.update(dict.fromkeys(OTHER, 0.5))
    return row


@pytest.fixture
def out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    perception = out / "perception"
    rows = [perception_row(step) for step in range(6)]
    rows[2]["reward/keyword/mean"] = "nan"  # no sample had a keyword to score
    rows.insert(3, {"step": 2, "lr-AdamW": 1e-5})  # a row of other metrics, same step
    write_metrics(perception, 0, rows)
    # a resumed run: its steps 4 and 5 replace the interrupted run's
    write_metrics(perception, 1, [perception_row(step, scale=2.0) for step in range(4, 9)])
    reasoning_rows = [
        {"step": s, "reward/total/mean": s, "reward/accuracy/mean": s / 2, "reward/format/mean": 1}
        for s in range(3)
    ]
    write_metrics(out / "reasoning", 0, reasoning_rows)
    write_metrics(out / "sft", 0, [{"step": 0, "train/loss": 2.0}])
    return out


def test_perception_panel_holds_every_reward_component_and_the_kl(out):
    panel = curve_panels(out)["perception"]
    components = [f"reward/{name}/mean" for name in sorted(PERCEPTION_REWARDS)]
    assert list(panel) == ["reward/total/mean", *components, "train/kl"]
    assert panel["reward/total/mean"] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 8.0), (5, 10.0), (6, 12.0), (7, 14.0),
        (8, 16.0),
    ]  # fmt: skip
    assert [s for s, _ in panel["reward/keyword/mean"]] == [0, 1, 3, 4, 5, 6, 7, 8]  # NaN left out
    assert panel["train/kl"][-1] == (8, pytest.approx(0.008))


def test_reasoning_panel_without_kl_and_no_sft_panel(out):
    panels = curve_panels(out)
    assert list(panels) == ["perception", "reasoning"]
    assert list(panels["reasoning"]) == [
        "reward/total/mean",
        "reward/accuracy/mean",
        "reward/format/mean",
    ]


def test_moving_average_by_hand():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 10.0], 3) == pytest.approx(
        [1.0, 1.5, 2.0, 3.0, 17 / 3]
    )
    assert moving_average([4.0, 0.0, 2.0], 1) == [4.0, 0.0, 2.0]
    assert moving_average([4.0, 0.0, 2.0], 0) == [4.0, 0.0, 2.0]
    assert moving_average([4.0, 0.0], 10) == [4.0, 2.0]
    assert moving_average([], 5) == []


def test_smoothing_window_grows_with_the_run():
    assert smoothing_window(9) == 5
    assert smoothing_window(400) == 20
    assert smoothing_window(100_000) == 50


def test_figure_draws_each_curve_smoothed_with_kl_on_its_own_axis(out):
    panels = curve_panels(out)
    figure = curve_figure(panels)
    perception, kl_axes, reasoning = figure.axes  # twinx adds its axes after its host's
    assert perception.get_title().startswith("perception RL")
    assert "moving average of 5 steps" in perception.get_title()
    assert (perception.get_xlabel(), perception.get_ylabel()) == ("training step", "reward")
    assert kl_axes.get_ylabel() == "KL"
    legend = [t.get_text() for t in kl_axes.get_legend().get_texts()]
    assert legend == ["total", *sorted(PERCEPTION_REWARDS), "KL to reference"]
    total_line = perception.get_lines()[0]
    values = [v for _, v in panels["perception"]["reward/total/mean"]]
    assert list(total_line.get_ydata()) == pytest.approx(moving_average(values, 5))
    assert len(perception.collections) == 1 + len(PERCEPTION_REWARDS)  # the raw dots
    assert reasoning.get_title().startswith("reasoning RL")
    assert [t.get_text() for t in reasoning.get_legend().get_texts()] == [
        "total",
        "accuracy",
        "format",
    ]


def test_plot_curves_writes_a_png(out):
    path = out / "pictures" / "rewards.png"
    assert plot_curves(out, path) == path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1300, 480)  # two panels of 6.5 x 4.8 inches at 100 dpi
    assert [p.name for p in path.parent.iterdir()] == ["rewards.png"]  # no temporary left


def test_stage_without_logs_yet_is_an_empty_panel(tmp_path):
    (tmp_path / "reasoning").mkdir()
    assert curve_panels(tmp_path) == {"reasoning": {}}
    path = plot_curves(tmp_path, tmp_path / "rewards.png")
    assert path is not None
    with Image.open(path) as image:
        assert image.size == (650, 480)


def test_no_rl_stage_folder_gives_none(tmp_path):
    write_metrics(tmp_path / "sft", 0, [{"step": 0, "train/loss": 2.0}])
    assert plot_curves(tmp_path, tmp_path / "rewards.png") is None
    assert not (tmp_path / "rewards.png").exists()
