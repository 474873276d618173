"""benchmarks/learning.py in a tiny mode: seeds run apart, the ablation gets the RL steps
of both stages, and the table is the mean ± std of the per-seed figures; its targets and
ablation line on hand-made per-seed figures."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import learning  # noqa: E402

GRPO = [
    "--trainer.max_steps=2",
    "--model.init_args.sampling.group_size=2",
    "--model.init_args.sampling.max_new_tokens=8",
    "--data.init_args.batch_size=2",
]


def tiny_schedule(tmp_path: Path, data: dict[str, Path]) -> Path:
    sft = yaml.safe_load((REPO / "configs" / "demo" / "sft.yaml").read_text())
    sft["trainer"]["callbacks"][1]["init_args"] = {"save_last": True, "every_n_train_steps": 2}
    sft["trainer"].update(val_check_interval=None, limit_val_batches=0, log_every_n_steps=1)
    sft["data"]["init_args"].update(batch_size=4, num_workers=0)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    train = str(data["train"])
    schedule = {
        "out": "unused",
        "model": "tiny-qwen2.5-vl",
        "data": {"train": train, "test": str(data["val"])},
        "eval": {"batch_size": 8, "max_new_tokens": 8, "limit": 8, "progress": False, "samples": 2},
        "stages": {
            "sft": {"config": str(tmp_path / "sft.yaml"), "args": ["--trainer.max_steps=3"]},
            "sample": {"k": 2, "max_new_tokens": 8, "limit": 4, "batch_size": 4},
            # A 3-step model answers nothing right, so no split has data: train on all.
            "perception": {
                "config": str(REPO / "configs/demo/perception.yaml"),
                "manifest": train,
                "args": GRPO,
            },
            "reasoning": {
                "config": str(REPO / "configs/demo/reasoning.yaml"),
                "manifest": train,
                "args": GRPO,
            },
        },
    }
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(schedule))
    return path


def logged_steps(stage_dir: Path) -> list[int]:
    (path,) = stage_dir.glob("lightning_logs/version_*/metrics.csv")
    return sorted({int(r["step"]) for r in csv.DictReader(path.open()) if r.get("step")})


def test_learning_benchmark_tiny_mode(tiny_path, shapes_data, tmp_path) -> None:
    out = tmp_path / "learning"
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/learning.py",
            "--schedule",
            str(tiny_schedule(tmp_path, shapes_data)),
            "--seeds",
            "0,1",
            "--out",
            str(out),
            "--fixed-questions",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "learning.json").read_text())
    assert data["seeds"] == [0, 1]

    # Each seed ran the whole schedule, and the seeds drew differently.
    runs = [data["runs"][s]["rows"] for s in ("0", "1")]
    for rows in runs:
        assert set(rows) == {"sft", "perception", "reasoning", "reasoning-only"}
    assert runs[0]["sft"]["start"] != runs[1]["sft"]["start"]

    # The ablation started from that seed's SFT weights with 2 + 2 RL steps.
    for seed in (0, 1):
        ablation = out / f"seed{seed}-reasoning-only" / "reasoning"
        done = json.loads((ablation / "DONE.json").read_text())
        sft = json.loads((out / f"seed{seed}" / "sft" / "DONE.json").read_text())
        assert done["started_from"] == sft["weights"]
        assert len(logged_steps(ablation)) == 4
        assert len(logged_steps(out / f"seed{seed}" / "reasoning")) == 2

    # Table cells are mean ± std of the per-seed figures.
    greedy = [rows["perception"]["heldout"]["accuracy"] for rows in runs]
    row = re.search(r"^\| perception \| reward/total/mean \| .*$", result.stdout, re.M)
    assert row, result.stdout
    cells = [c.strip() for c in row.group(0).strip("|").split("|")]
    expected = f"{statistics.fmean(greedy):.3f} ± {statistics.stdev(greedy):.3f}"
    assert cells[4] == expected
    for stage in ("sft", "reasoning", "reasoning-only"):
        assert re.search(rf"^\| {stage} \| ", result.stdout, re.M), stage

    # Every target is reported with its per-seed figures and a verdict.
    names = [t["target"] for t in data["targets"]]
    assert any(n.startswith("Stage 1: perception reward +0.05") for n in names)
    assert "Ablation, held-out greedy, two-stage vs reasoning-only: seed 0 " in result.stdout
    assert all(len(t["values"]) == 2 and isinstance(t["met"], bool) for t in data["targets"])
    assert (out / "learning.md").read_text().strip() in result.stdout
    assert (out / "seed1" / "rewards.png").stat().st_size > 0

    # Stage 1's reward on fixed questions, start and end weights, paired.
    for seed in ("0", "1"):
        fixed = data["runs"][seed]["fixed_set"]
        assert fixed["questions"] == 2 and fixed["group_size"] == 8
        assert fixed["difference"] == pytest.approx(fixed["end"] - fixed["start"])
        assert fixed["standard_error"] >= 0
        # 3 SFT steps from random weights: far from what the reference responses get
        assert fixed["reference"] > fixed["end"] + 0.2
        assert fixed["per_reward"]["reference"]["format"] == 1.0
        assert fixed == json.loads(
            (out / f"seed{seed}" / "perception" / "fixed_set.json").read_text()
        )
    assert "Stage 1 reward on 2 fixed questions of its split" in result.stdout


def stage(metric: str, start: float, end: float, **heldout: float) -> dict:
    keys = {"shapes": "perception/shapes", "desc_right": "accuracy/desc_right"}
    figures = {keys.get(k, k): v for k, v in heldout.items()}
    return {"metric": metric, "start": start, "end": end, "heldout": figures}


# Two seeds, figures chosen by hand (majority baseline 0.4).
RUNS = {
    0: {
        "rows": {
            "sft": stage("train/loss", 1.2, 0.1, accuracy=0.62, shapes=0.30),
            "perception": stage(
                "reward/total/mean", 0.50, 0.58, accuracy=0.58, shapes=0.40, desc_right=0.70
            ),
            "reasoning": stage("reward/accuracy/mean", 0.4, 0.5, accuracy=0.67, desc_right=0.75),
            "reasoning-only": stage("reward/accuracy/mean", 0.4, 0.5, accuracy=0.55),
        },
        "sample": None,
    },
    1: {
        "rows": {
            "sft": stage("train/loss", 1.2, 0.1, accuracy=0.50, shapes=0.35),
            "perception": stage(
                "reward/total/mean", 0.60, 0.64, accuracy=0.52, shapes=0.37, desc_right=0.80
            ),
            "reasoning": stage("reward/accuracy/mean", 0.4, 0.5, accuracy=0.51, desc_right=0.78),
            "reasoning-only": stage("reward/accuracy/mean", 0.4, 0.5, accuracy=0.57),
        },
        "sample": None,
    },
}


def test_targets_on_hand_made_seeds():
    """Per seed (0, 1), by hand:

    - SFT greedy - baseline: 0.22, 0.10; mean 0.16 >= 0.15: met.
    - perception/shapes sft -> perception: +0.10, +0.02; mean 0.06 >= 0.05, none down: met.
    - perception reward end - start: +0.08, +0.04; seed 1 < 0.05: not met.
    - greedy perception -> reasoning: +0.09, -0.01; mean 0.04 >= 0.03, but seed 1 is
      below: not met.
    - accuracy/desc_right perception -> reasoning: +0.05, -0.02; mean 0.015 > 0: met.
    """
    found = learning.targets(RUNS, baseline=0.4)
    assert [t["target"].split(":")[0] for t in found] == ["SFT", *["Stage 1"] * 2, *["Stage 2"] * 2]
    assert [t["values"] for t in found] == [
        pytest.approx([0.22, 0.10]),
        pytest.approx([0.10, 0.02]),
        pytest.approx([0.08, 0.04]),
        pytest.approx([0.09, -0.01]),
        pytest.approx([0.05, -0.02]),
    ]
    assert [t["met"] for t in found] == [True, True, False, False, True]
    assert "perception/shapes" in found[1]["target"]
    assert "accuracy/desc_right" in found[4]["target"]


def test_report_has_the_decomposition_columns_and_the_ablation_line():
    result = {
        "seeds": [0, 1],
        "majority_baseline": 0.4,
        "runs": {str(s): r for s, r in RUNS.items()},
        "targets": learning.targets(RUNS, 0.4),
        "ablation": learning.ablation_pairs(RUNS),
        "seconds": 1.0,
    }
    assert result["ablation"] == [
        {"seed": 0, "two_stage": 0.67, "reasoning_only": 0.55},
        {"seed": 1, "two_stage": 0.51, "reasoning_only": 0.57},
    ]
    report = learning.format_report(result)
    lines = report.splitlines()
    header = next(line for line in lines if line.startswith("| stage |"))
    titles = [c.strip() for c in re.split(r"(?<!\\)\|", header.strip("|"))]
    assert titles[-4:] == [
        "desc. shapes right",
        "desc. shapes in order",
        r"acc. \| desc. right",
        r"acc. \| desc. wrong",
    ]
    row = next(line for line in lines if line.startswith("| perception |"))
    assert len(row.strip("|").split("|")) == len(titles)  # the row lines up with the header
    assert "| 0.385 ± 0.021 | — | 0.750 ± 0.071 | — |" in row  # shapes, in order, right, wrong
    assert (
        "| Stage 1: perception reward +0.05, first vs last 10% (every seed) | +0.080, +0.040 | NO |"
        in lines
    )
    assert lines[-3] == (
        "Ablation, held-out greedy, two-stage vs reasoning-only: seed 0 0.670 vs 0.550; "
        "seed 1 0.510 vs 0.570"
    )


def test_question_reuse_counts_draws_over_distinct_questions(tmp_path):
    """Perception: 200 steps x 4 prompts = 800 draws over a split of 500 -> all 500 drawn,
    800 / 500 = 1.6 each. Reasoning: 150 x 4 = 600 draws over 824 -> 600 distinct, 1.0.
    A stage without a split (SFT) is left out."""
    config = tmp_path / "rl.yaml"
    config.write_text("data:\n  init_args:\n    batch_size: 4\ntrainer:\n  max_steps: 5\n")
    schedule = learning.load_schedule("configs/demo/schedule.yaml")
    fit = {
        "sft": learning.FitStage("sft", str(config), ()),
        "perception": learning.FitStage(
            "perception", str(config), ("--trainer.max_steps=200",), "easy"
        ),
        "reasoning": learning.FitStage(
            "reasoning", str(config), ("--trainer.max_steps=150",), "medium"
        ),
    }
    schedule = dataclasses.replace(schedule, fit=fit)
    reuse = learning.question_reuse(schedule, {"easy": 500, "medium": 824, "hard": 10})
    assert reuse == {
        "perception": {"draws": 800, "questions": 500, "seen": 1.6},
        "reasoning": {"draws": 600, "questions": 824, "seen": 1.0},
    }
