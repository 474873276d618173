"""FSDP2 end to end: `pebr fit` on 2 real gloo processes (torchrun) with
`pebr_lightning.parallel.FSDP2Strategy` trains exactly what 1 process does with the
same global batch: same losses and rewards step by step, same weights at the end.

Why they can match: the training order is cut into global batches whatever the
process count (data/sampler.py), the SFT loss and GRPO's token-mean loss are
normalised by the token count of all processes, and rollout noise is keyed by
sample id (algorithms/sampling.py), so each sample draws the same completions.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from pebr_demo.testing.processes import torchrun_fit
from pebr_lightning.cli import main

REPO = Path(__file__).resolve().parents[2]
SPREAD = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}
STEPS = 2
LORA = json.dumps({"r": 16, "alpha": 32, "dropout": 0.0})


def stage_args(stage: str, train: Path) -> tuple[list[str], str]:
    """Overrides of the demo config of `stage`, and the .hf file holding the trained weights."""
    common = [
        "--data.init_args.train_manifest",
        str(train),
        "--data.init_args.num_workers",
        "0",
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.log_every_n_steps",
        "1",
    ]
    if stage == "sft":
        # full fine-tuning of every weight, vision tower included
        return [
            "--config",
            str(REPO / "configs/demo/sft.yaml"),
            *common,
            "--data.init_args.val_manifest",
            "null",
        ], "model.safetensors"
    rewards = [{"name": "format", "weight": 0.1}, {"name": "length", "weight": 0.1}, SPREAD]
    return [
        "--config",
        str(REPO / "configs/demo/perception.yaml"),
        *common,
        "--model.init_args.rewards",
        json.dumps(rewards),
        "--model.init_args.sampling.group_size",
        "4",
        "--model.init_args.sampling.max_new_tokens",
        "12",
        "--model.init_args.update.micro_batch_size",
        "3",  # micro-batches cut across groups
        # grpo-full: the demo config's setting, every weight, with a sharded frozen copy
        # as the KL reference; grpo: a LoRA policy (the configs/fsdp/ GRPO setting).
        *([] if stage == "grpo-full" else ["--model.init_args.policy.lora", LORA]),
    ], "model.safetensors" if stage == "grpo-full" else "adapter_model.safetensors"


def run_two_processes(args: list[str], root: Path) -> None:
    done = torchrun_fit([*args, "--trainer.default_root_dir", str(root)], nproc=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def logged(root: Path) -> list[dict[str, float]]:
    (path,) = root.rglob("metrics.csv")
    rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(path.open())]
    return [r for r in rows if "train/loss" in r]


@pytest.mark.parametrize("stage", ["sft", "grpo", "grpo-full"])
def test_two_process_fsdp_fit_matches_one_process(stage, tmp_path, shapes_data, tiny_path):
    args, weights = stage_args(stage, shapes_data["train"])
    one, two = tmp_path / "one", tmp_path / "two"
    # one process: 4 prompts per step; two processes: 2 prompts each
    assert (
        main(
            [
                "fit",
                *args,
                "--data.init_args.batch_size",
                "4",
                "--trainer.default_root_dir",
                str(one),
            ]
        )
        == 0
    )
    run_two_processes([*args, "--data.init_args.batch_size", "2"], two)

    (ckpt,) = two.rglob("last.ckpt")
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard per process

    a = load_file(next(one.rglob(f"last.hf/{weights}")))
    b = load_file(next(two.rglob(f"last.hf/{weights}")))
    assert set(a) == set(b)
    full = stage != "grpo"  # every weight (else a LoRA adapter)
    start = load_file(tiny_path / "model.safetensors") if full else {}
    for name in a:
        # Adam divides each gradient by its own running size, so a weight whose gradient
        # is nearly 0 takes a step whose size rounding decides, and the two runs add
        # their gradients in different orders: measured up to 2 % of the distance a
        # weight moved (2e-6 of 1e-4, GRPO on every weight). Allowed: 10 % of it.
        moved = (a[name] - start[name]).abs().max().item() if name in start else 0.0
        torch.testing.assert_close(
            b[name], a[name], rtol=1e-4, atol=max(1e-6, 0.1 * moved), msg=name
        )

    # the runs trained something (else matching would prove nothing)
    if full:
        assert any(not torch.equal(a[k], start[k]) for k in a if k in start)
    else:
        assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # LoRA B starts at 0

    # the sharded checkpoint folder exports to the same weights as the gathered .hf folder
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out), "--dtype", "float32"]) == 0
    if full:
        exported = AutoModelForImageTextToText.from_pretrained(out / "merged").state_dict()
        gathered = AutoModelForImageTextToText.from_pretrained(ckpt.with_suffix(".hf"))
        for name, value in gathered.state_dict().items():
            torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)
    else:
        exported = load_file(out / "adapter" / weights)
        assert set(exported) == set(b)
        for name in b:
            torch.testing.assert_close(exported[name], b[name], rtol=0, atol=0, msg=name)

    rows_one, rows_two = logged(one), logged(two)
    # GRPO: the same rewards (so the same completions) and the same global grad norm
    keys = ["train/loss"] if stage == "sft" else ["reward/total/mean", "train/grad_norm"]
    assert len(rows_one) == len(rows_two) == STEPS
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in keys:
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key
