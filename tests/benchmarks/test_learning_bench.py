"""benchmarks/learning.py in a tiny mode: seeds run apart, the ablation gets the RL steps
of both stages, and the table is the mean ± std of the per-seed figures."""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
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
    assert any(n.startswith("perception reward +0.05") for n in names)
    assert all(len(t["values"]) == 2 and isinstance(t["met"], bool) for t in data["targets"])
    assert (out / "learning.md").read_text().strip() in result.stdout
    assert (out / "seed1" / "rewards.png").stat().st_size > 0
