"""Runs that are told to stop, or whose reward ends the process, never exit as finished.

SLURM and Kubernetes stop a job with SIGTERM; a script reads exit 0 as "done". So a run
stopped before its end exits 143 (128 + SIGTERM) with a line saying so, a reward that
calls sys.exit is reported as the fault it is, and a run stuck where no Python code can
run (a C call holding the interpreter lock) is still stopped, by a watchdog process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pebr_demo.testing import ExitingReward
from pebr_lightning.cli import main
from pebr_lightning.rewards.combine import RewardError, RewardSet, WeightedReward

from .test_checkpoints import sft_args  # a checkpoint (and .hf) every step

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
PEBR = str(Path(sys.executable).with_name("pebr"))


def grpo_args(train: Path, root: Path, reward: dict, steps: int = 3) -> list[str]:
    """The demo reasoning config with `reward` beside a spread reward, tiny groups."""
    spread = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward"}
    return [
        "--config", str(REPO / "configs/demo/reasoning.yaml"),
        "--model.init_args.rewards", json.dumps([spread, reward]),
        "--model.init_args.sampling.group_size", "2",
        "--model.init_args.sampling.max_new_tokens", "8",
        "--data.init_args.train_manifest", str(train),
        "--data.init_args.batch_size", "2",
        "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=pebr_lightning.callbacks.HFCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
    ]  # fmt: skip


def wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, what: str) -> None:
    root, pattern = path_glob
    deadline = time.monotonic() + 240
    while not list(root.glob(pattern)):
        assert proc.poll() is None, f"ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.2)


def test_sigterm_mid_fit_exits_143_and_says_where_it_stopped(tiny_path, shapes_data, tmp_path):
    """Before: Lightning stops a fit on SIGTERM with a SystemExit that has no code, and
    `pebr fit` exited 0, as a finished run does."""
    root = tmp_path / "run"
    proc = subprocess.Popen(
        [PEBR, *sft_args(shapes_data["train"], root, 400)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for((root, "**/last.ckpt"), proc, "its first checkpoint")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 143, err[-3000:]
    assert "error: stopped by SIGTERM at step " in err
    assert "before the run finished" in err
    step = int(err.split("stopped by SIGTERM at step ")[1].split(",")[0])
    assert 1 <= step < 400
    (last,) = root.rglob("last.ckpt")
    assert 1 <= torch.load(last, weights_only=True)["global_step"] <= step


def test_sigterm_mid_schedule_exits_143_and_leaves_the_stage_unfinished(
    tiny_path, shapes_data, tmp_path
):
    """Before: `pebr schedule` exited 0 with the stage unfinished and no message; the
    rerun resumes the stage from its last checkpoint."""
    from tests.schedule.test_schedule import write_schedule

    config = write_schedule(tmp_path, shapes_data, sft_steps=400)
    stage = tmp_path / "out" / "sft"
    proc = subprocess.Popen(
        [PEBR, "schedule", "--config", str(config), "--stages", "sft"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for((stage, "lightning_logs/version_0/checkpoints/last.ckpt"), proc, "a checkpoint")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "error: stopped by SIGTERM at step " in err
    assert "the same `pebr schedule` command resumes a schedule" in err
    assert not (stage / "DONE.json").exists()
    assert not (tmp_path / "out" / "report.md").exists()  # no table of a finished schedule


def test_a_reward_calling_sys_exit_is_a_reward_error_naming_it() -> None:
    """Both call paths: in the training process, and in the thread `timeout_s` uses."""
    completions, samples = ["a", "b"], [{"id": "s0"}, {"id": "s1"}]
    for timeout_s in (None, 5.0):
        rewards = RewardSet([WeightedReward(ExitingReward(code=0), 1.0, timeout_s=timeout_s)])
        with pytest.raises(RewardError, match=r"reward 'exiting' called sys.exit\(0\)"):
            rewards(completions, samples)


def test_a_reward_calling_sys_exit_stops_fit_with_exit_2(tiny_path, shapes_data, tmp_path, capsys):
    """Before: the SystemExit(0) went up through Lightning and `pebr fit` exited 0 after
    one step of three, without a word."""
    reward = {"class_path": "pebr_demo.testing.ExitingReward", "init_args": {"step": 1}}
    root = tmp_path / "run"
    code = main(["fit", *grpo_args(shapes_data["train"], root, reward)])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "reward 'exiting' called sys.exit(0) instead of returning scores" in err
    (last,) = root.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 1  # step 1 is kept


def test_a_reward_holding_the_interpreter_is_killed_after_sigterm(tiny_path, shapes_data, tmp_path):
    """A regex backtracking for hours holds the GIL in one C call: no signal handler or
    timer thread runs. Before: alive 60 s after SIGTERM with a 10 s grace. Now the
    watchdog process kills it shortly after the grace (here 2 s + 5 s) and says why."""
    marker = tmp_path / "hogging"
    reward = {
        "class_path": "pebr_demo.testing.GILHoggingReward",
        "init_args": {"step": 1, "marker": str(marker)},
    }
    root = tmp_path / "run"
    proc = subprocess.Popen(
        [PEBR, "fit", *grpo_args(shapes_data["train"], root, reward)],
        env={**ENV, "PEBR_SIGTERM_GRACE_S": "2"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for((tmp_path, "hogging"), proc, "the regex")
        time.sleep(0.5)  # well inside the match
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == -signal.SIGKILL, err[-3000:]
    assert "error: still running 7 s after SIGTERM, stuck in a call that holds the" in err
    assert 6.0 <= took < 30.0
    (last,) = root.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 1
