"""The README's promises: two quickstart commands that exist, a layout that lists every file."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

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


def test_make_demo_runs_in_a_short_mode(tmp_path):
    """The README's main command, with fewer steps and its outputs in tmp_path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = (
        f"--trainer.max_steps 2 --trainer.val_check_interval 2 --trainer.limit_val_batches 1 "
        f"--data.init_args.batch_size 4 --data.init_args.num_workers 0 "
        f"--trainer.default_root_dir {tmp_path / 'run'}"
    )
    result = subprocess.run(
        ["make", "demo", f"DEMO_DIR={tmp_path / 'data'}", f"DEMO_ARGS={args}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "wrote 2000 records" in result.stdout
    assert re.search(r"train/loss: first 10% of steps \d+\.\d+ -> last 10% \d+\.\d+", result.stdout)
    assert list((tmp_path / "run").rglob("last.ckpt"))
