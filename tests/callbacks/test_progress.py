"""The progress bar: training figures on it in a terminal; plain lines without one.

Both runs are the real `pebr fit` console script on a GRPO config: once with a real
pseudo-terminal as stdout (what a user at a shell sees), once with a pipe (a log
file, CI, a batch job).
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLAIN_LINE = "step     3 | reward/accuracy/mean"  # MetricsPrinter's line in reasoning.yaml


def fit_args(tmp_path: Path, train: Path) -> list[str]:
    return [
        str(Path(sys.executable).with_name("pebr")),
        "fit",
        "--config",
        str(REPO / "configs" / "demo" / "reasoning.yaml"),
        "--data.init_args.train_manifest",
        str(train),
        "--data.init_args.batch_size",
        "2",
        # a reward with spread on random text, so that the update runs (KL, clip)
        "--model.init_args.rewards=[{class_path: pebr_demo.testing.spread_reward"
        ".VowelShareReward, weight: 1.0}, {name: accuracy, weight: 0.0}]",
        "--model.init_args.sampling.group_size",
        "4",
        "--model.init_args.sampling.max_new_tokens",
        "8",
        "--trainer.max_steps",
        "3",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]


def run_in_terminal(args: list[str], timeout: float = 300) -> str:
    """Run `args` with a pseudo-terminal as stdout and stderr; everything it wrote."""
    leader, follower = pty.openpty()
    # a terminal has a size (a bare pty is 0 x 0, where tqdm draws nothing)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no output for {timeout} s")
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        proc.wait(timeout=60)
        os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def test_terminal_shows_the_bar_with_reward_kl_and_clip(tmp_path, shapes_data):
    out = run_in_terminal(fit_args(tmp_path, shapes_data["train"]))
    bar = [line for line in out.replace("\r", "\n").splitlines() if "reward=" in line]
    assert bar, out[-3000:]
    for name in ("reward=", "acc=", "kl=", "clip="):
        assert name in bar[-1], bar[-1]
    assert "it/s" in bar[-1] or "s/it" in bar[-1]
    assert PLAIN_LINE not in out  # no plain lines beside the bar


def test_without_a_terminal_plain_lines_and_no_bar(tmp_path, shapes_data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        fit_args(tmp_path, shapes_data["train"]), capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert PLAIN_LINE in result.stdout
    both = result.stdout + result.stderr
    assert "reward=" not in both and "it/s" not in both and "s/it" not in both
