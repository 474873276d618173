"""A reward that hangs: `timeout_s` in its config entry turns a hang into a fault."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pebr_lightning.rewards.combine import RewardError, RewardSet, WeightedReward, load_rewards
from pebr_lightning.rewards.registry import RewardConfigError, RewardSpec


class SleepyReward:
    """Sleeps `seconds` (until released, when `seconds` is None), then scores 1."""

    name = "sleepy"

    def __init__(self, seconds: float | None = 30.0) -> None:
        self.seconds = seconds
        self.release = threading.Event()

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> list[float]:
        self.release.wait(self.seconds)
        return [1.0] * len(completions)


class CountReward:
    """Scores each completion by its index: 0, 1, 2, ..."""

    name = "count"

    def __call__(self, *, completions: list[str], samples: list[dict], **context: Any) -> list:
        return [float(i) for i in range(len(completions))]


def batch(n: int) -> tuple[list[str], list[dict]]:
    return [f"text {i}" for i in range(n)], [{"id": f"s{i}"} for i in range(n)]


def spec(on_error: str, seconds: float | None, timeout_s: float | None = 0.2) -> RewardSet:
    """count (weight 0.5) + a sleepy reward (weight 0.5) with the given fault policy."""
    sleepy = SleepyReward(seconds)
    return RewardSet(
        [
            WeightedReward(CountReward(), 0.5),
            WeightedReward(sleepy, 0.5, on_error=on_error, timeout_s=timeout_s),
        ]
    )


def test_a_hung_reward_with_raise_policy_stops_naming_reward_timeout_and_setting() -> None:
    reward_set = spec("raise", seconds=None)
    start = time.perf_counter()
    with pytest.raises(RewardError) as info:
        reward_set(*batch(3))
    waited = time.perf_counter() - start
    reward_set.rewards[1].reward.release.set()  # let the abandoned thread finish
    message = str(info.value)
    assert "reward 'sleepy'" in message
    assert "timeout_s=0.2" in message
    assert "s0, s1, s2" in message
    assert "on_error: none" in message
    assert 0.2 <= waited < 5.0


def test_a_hung_reward_with_none_policy_scores_none_and_counts_faults() -> None:
    reward_set = spec("none", seconds=None)
    result = reward_set(*batch(3))
    reward_set.rewards[1].reward.release.set()
    assert result.per_reward["sleepy"] == [None, None, None]
    assert result.faults == {"count": 0, "sleepy": 3}
    assert result.total == result.per_reward["count"]  # renormalised over `count` alone


def test_a_reward_within_its_timeout_scores_normally() -> None:
    result = spec("raise", seconds=0.0, timeout_s=5.0)(*batch(2))
    assert result.per_reward["sleepy"] == [1.0, 1.0]
    assert result.faults["sleepy"] == 0


def test_timeout_s_is_checked_and_round_trips() -> None:
    with pytest.raises(RewardConfigError, match=r"'format': timeout_s must be > 0"):
        RewardSpec(name="format", timeout_s=0)
    data = RewardSpec(name="format", timeout_s=2.5).to_dict()
    assert data["timeout_s"] == 2.5
    assert RewardSpec.from_dict(data) == RewardSpec(name="format", timeout_s=2.5)
    assert "timeout_s" not in RewardSpec(name="format").to_dict()
    assert load_rewards([{"name": "format", "timeout_s": 3}]).rewards[0].timeout_s == 3.0


def test_sigterm_stops_a_run_whose_reward_hangs_without_a_timeout(tmp_path, shapes_data) -> None:
    """Before: Lightning's SIGTERM handler only sets a flag checked between batches, and
    a reward hung inside a batch never got there: the run ignored SIGTERM for good. Now
    the run stops PEBR_SIGTERM_GRACE_S after it (here 3 s), exit 143, and the checkpoint
    of step 1 is whole."""
    import torch

    repo = Path(__file__).resolve().parents[2]
    marker = tmp_path / "hanging"
    hang = {"class_path": "pebr_demo.testing.HangingReward",
            "init_args": {"step": 1, "marker": str(marker)}}  # fmt: skip
    spread = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward"}
    root = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pebr_lightning.cli", "fit",
         "--config", str(repo / "configs/demo/reasoning.yaml"),
         "--model.init_args.rewards", json.dumps([spread, hang]),
         "--model.init_args.sampling.group_size", "2",
         "--model.init_args.sampling.max_new_tokens", "8",
         "--data.init_args.train_manifest", str(shapes_data["train"]),
         "--data.init_args.batch_size", "2",
         "--trainer.max_steps", "5",
         "--trainer.default_root_dir", str(root),
         "--trainer.callbacks+=pebr_lightning.callbacks.HFCheckpoint",
         "--trainer.callbacks.every_n_train_steps=1",
         "--trainer.callbacks.save_last=true"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
             "PEBR_SIGTERM_GRACE_S": "3"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():  # step 1 trained and checkpointed; step 2's reward hangs
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the reward never started hanging"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "error: still running 3 s after SIGTERM" in err
    assert not [p for p in root.rglob("*partial*")]
    checkpoints = list(root.rglob("*.ckpt"))
    assert checkpoints
    for ckpt in checkpoints:
        assert torch.load(ckpt, weights_only=True)["global_step"] == 1
