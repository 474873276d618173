"""Resume after `kill -9`: a run killed mid-stage and resumed with `--ckpt_path last`
ends exactly where the same run without the interruption ends (SFT and GRPO demo
configs, shortened; GRPO with LoRA and with every weight): same later losses and
rewards, same final weights.

What makes it so: the data module's checkpoint state holds the epoch, the batches
already trained on and the RNG states (the sampler skips those batches on resume);
Lightning restores optimizer, scheduler and step counters; GRPO rollout noise is
keyed by step and sample id, so the resumed rollouts are the ones the uninterrupted
run drew.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pebr_lightning.cli import main

REPO = Path(__file__).resolve().parents[2]
SPREAD = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}
STEPS, KILL_AT = 4, 2


def stage_args(stage: str, train: Path, root: Path) -> tuple[list[str], str]:
    common = [
        "--data.init_args.train_manifest",
        str(train),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "2",
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.default_root_dir",
        str(root),
        # a last.ckpt after every step, as a long run would every N steps
        "--trainer.callbacks+=pebr_lightning.callbacks.HFCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
    ]
    if stage == "sft":
        config = REPO / "configs/demo/sft.yaml"
        return ["--config", str(config), *common, "--data.init_args.val_manifest", "null"], (
            "model.safetensors"
        )
    rewards = [{"name": "format", "weight": 0.1}, SPREAD]
    args = [
        "--config",
        str(REPO / "configs/demo/perception.yaml"),
        *common,
        "--model.init_args.rewards",
        json.dumps(rewards),
        "--model.init_args.sampling.group_size",
        "4",
        "--model.init_args.sampling.max_new_tokens",
        "12",
    ]
    if stage == "grpo-full":  # the demo's setting: every weight, KL to a frozen copy
        return args, "model.safetensors"
    # dropout draws from the RNG: the resumed run must continue its stream
    lora = json.dumps({"r": 8, "alpha": 16, "dropout": 0.1})
    return [*args, "--model.init_args.policy.lora", lora], "adapter_model.safetensors"


def metrics(root: Path, version: int) -> dict[int, dict[str, float]]:
    path = root / "lightning_logs" / f"version_{version}" / "metrics.csv"
    rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(path.open())]
    return {int(r["step"]): r for r in rows if "train/loss" in r}


@pytest.mark.parametrize("stage", ["sft", "grpo", "grpo-full"])
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(stage, tmp_path, shapes_data):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args, weights = stage_args(stage, shapes_data["train"], whole)
    assert main(["fit", *args]) == 0

    args, _ = stage_args(stage, shapes_data["train"], cut)
    killed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pebr_lightning.cli",
            "fit",
            *args,
            "--trainer.callbacks+=pebr_demo.testing.KillAtStep",
            f"--trainer.callbacks.step={KILL_AT}",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL, not a clean exit
    saved = torch.load(cut / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == KILL_AT
    if stage != "sft":  # rewards recorded as the config named them: a registry name
        first = saved["pebr_rewards"][0]
        assert first["name"] == "format" and "class_path" not in first

    assert main(["fit", *args, "--ckpt_path", "last"]) == 0  # a new version_1 continues

    a = load_file(next((whole / "lightning_logs/version_0/checkpoints/last.hf").glob(weights)))
    b = load_file(next((cut / "lightning_logs/version_1/checkpoints/last.hf").glob(weights)))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)

    full, resumed = metrics(whole, 0), metrics(cut, 1)
    assert len(full) == STEPS and sorted(resumed) == sorted(full)[KILL_AT:]
    keys = ["train/loss"] + ([] if stage == "sft" else ["reward/total/mean", "train/grad_norm"])
    for step, row in resumed.items():
        for key in keys:
            assert row[key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)
