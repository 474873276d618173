"""vLLM engine runs end to end: a full-weight fit killed and resumed, FSDP2 on two
processes through one worker (the worker tests are in test_vllm.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pebr_lightning.models.rollout import SamplingConfig

from ..conftest import vllm_python
from .test_vllm import workers_of

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[2]
SPREAD = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}
GREEDY = SamplingConfig(group_size=1, temperature=0.0, max_new_tokens=12)


def test_a_full_weight_grpo_fit_through_vllm_killed_and_resumed_ends_like_an_uninterrupted_one(
    untied_path, shapes_data, tmp_path
):
    """Full fine-tuning through vLLM, killed with SIGKILL after step 2 and resumed:
    the worker of the killed run exits with it; the resumed run's new worker is synced
    to the restored weights before its first rollout, and the keyed seeds draw the
    same completions, so rewards, losses and final weights equal the uninterrupted
    run's. Each step's engine/trainer log-prob gap stays small (the reload is exact)."""
    from pebr_lightning.cli import main

    from ..reliability.test_resume import metrics

    steps, kill_at = 3, 2

    def args(root: Path) -> list[str]:
        return [
            "--config",
            str(REPO / "configs/demo/perception.yaml"),
            "--model.init_args.policy.model",
            str(untied_path),
            "--model.init_args.rewards",
            json.dumps([{"name": "format", "weight": 0.1}, SPREAD]),
            "--model.init_args.sampling.group_size",
            "4",
            "--model.init_args.sampling.max_new_tokens",
            "12",
            "--model.init_args.rollout",
            json.dumps(
                {"name": "vllm", "init_args": {"python": str(vllm_python()), "dtype": "float32"}}
            ),
            "--data.init_args.train_manifest",
            str(shapes_data["train"]),
            "--data.init_args.batch_size",
            "2",
            "--trainer.max_steps",
            str(steps),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.callbacks+=pebr_lightning.callbacks.HFCheckpoint",
            "--trainer.callbacks.every_n_train_steps=1",
            "--trainer.callbacks.save_last=true",
        ]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["fit", *args(whole)]) == 0
    assert workers_of(untied_path) == []  # the fit closed its worker
    killed = subprocess.run(
        [
            *(sys.executable, "-m", "pebr_lightning.cli", "fit", *args(cut)),
            "--trainer.callbacks+=pebr_demo.testing.KillAtStep",
            f"--trainer.callbacks.step={kill_at}",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    deadline = time.monotonic() + 30
    while workers_of(untied_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert workers_of(untied_path) == []  # it saw its stdin close and exited
    assert main(["fit", *args(cut), "--ckpt_path", "last"]) == 0

    full, resumed = metrics(whole, 0), metrics(cut, 1)
    assert len(full) == steps and sorted(resumed) == sorted(full)[kill_at:]
    for step, row in resumed.items():
        for key in ("reward/total/mean", "train/loss", "train/grad_norm"):
            assert row[key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)
    for row in full.values():
        assert 0 <= row["train/engine_logprob_gap"] < 0.02, row["train/engine_logprob_gap"]
    a = load_file(whole / "lightning_logs/version_0/checkpoints/last.hf/model.safetensors")
    b = load_file(cut / "lightning_logs/version_1/checkpoints/last.hf/model.safetensors")
    start = load_file(untied_path / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("weights", ["lora", "full"])
def test_fsdp2_on_two_processes_rolls_out_through_one_worker_like_one_process(
    weights, tiny_path, untied_path, shapes_data, tmp_path
):
    """FSDP2 on 2 real gloo processes, rollouts through vLLM (a LoRA adapter on the
    tiny model; every weight of its untied copy): rank 0 alone runs the worker,
    gathers the sharded weights and pushes them after each update, and sends both
    ranks' prompts in one batch. The run trains exactly what 1 process with the same
    global batch trains through vLLM: same rewards and grad norms step by step, same
    weights at the end (the keyed seeds draw the same completions wherever a prompt
    is served)."""
    from pebr_lightning.cli import main

    from ..parallel.test_fsdp_fit import logged, run_two_processes, stage_args

    args, file = stage_args("grpo", shapes_data["train"])  # LoRA r 16
    model = tiny_path
    if weights == "full":
        model, file = untied_path, "model.safetensors"
        args += [
            "--model.init_args.policy.lora",
            "null",
            "--model.init_args.policy.model",
            str(model),
        ]
    engine = {"name": "vllm", "init_args": {"python": str(vllm_python()), "dtype": "float32"}}
    args = [*args, "--model.init_args.rollout", json.dumps(engine)]
    one, two = tmp_path / "one", tmp_path / "two"
    batch = "--data.init_args.batch_size"
    assert main(["fit", *args, batch, "4", "--trainer.default_root_dir", str(one)]) == 0
    run_two_processes([*args, batch, "2"], two)
    assert workers_of(model) == []

    rows_one, rows_two = logged(one), logged(two)
    assert len(rows_one) == len(rows_two) == 2
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in ("reward/total/mean", "train/grad_norm"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key
        # vLLM sampled (the HF engine's gap is float noise, about 1e-7); 0.018 here, from
        # top_p 0.99 and the banned vision tokens, which vLLM's log-probs renormalise over
        assert 1e-3 < r2["train/engine_logprob_gap"] < 0.05
    a = load_file(next(one.rglob(f"last.hf/{file}")))
    b = load_file(next(two.rglob(f"last.hf/{file}")))
    start = load_file(model / "model.safetensors")
    assert set(a) == set(b) and any(k not in start or not torch.equal(a[k], start[k]) for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
