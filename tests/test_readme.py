"""The README's promises: two quickstart commands that exist, a layout that lists every file."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def quickstart_commands() -> list[str]:
    block = README.split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_quickstart_is_exactly_demo_and_test_and_ci_runs_the_test_command():
    assert quickstart_commands() == ["make demo", "make test"]
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci == ["make test"]


def test_layout_lists_every_package_file():
    layout = README.split("## Layout", 1)[1]
    listed = set(re.findall(r"\b(\w+\.py)\b", layout))
    missing = [
        str(path.relative_to(REPO))
        for path in (REPO / "pebr_lightning").rglob("*.py")
        if path.name != "__init__.py" and path.name not in listed
    ]
    assert not missing, f"README layout lacks: {missing}"


def test_make_demo_runs_the_schedule_in_a_short_mode(tmp_path):
    """The README's main command on a cut-down schedule (2 SFT steps, 4 held-out
    questions): it writes the data, trains, evaluates and prints the closing table."""
    sft = yaml.safe_load((REPO / "configs" / "demo" / "sft.yaml").read_text())
    sft["trainer"]["callbacks"][1]["init_args"] = {"save_last": True}
    sft["trainer"].update(
        val_check_interval=None, limit_val_batches=0, max_steps=2, log_every_n_steps=1
    )
    sft["data"]["init_args"].update(batch_size=4, num_workers=0)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    data = tmp_path / "data"
    schedule = {
        "out": str(tmp_path / "out"),
        "model": "tiny-qwen2.5-vl",
        "data": {split: str(data / split / "manifest.jsonl") for split in ("train", "test")},
        "synth": {"train": 8, "test": 4, "seed": 0},
        "eval": {"max_new_tokens": 4, "progress": False},
        "stages": {"sft": {"config": str(tmp_path / "sft.yaml")}},
    }
    (tmp_path / "schedule.yaml").write_text(yaml.safe_dump(schedule))
    result = subprocess.run(
        ["make", "demo", f"DEMO_CONFIG={tmp_path / 'schedule.yaml'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "writing 8 synthetic train records" in result.stdout
    assert re.search(r"\| sft \| train/loss \| \d+\.\d+ \| \d+\.\d+ \| \d\.\d+ \|", result.stdout)
    assert (tmp_path / "out" / "sft" / "DONE.json").exists()
