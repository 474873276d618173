"""End to end: `pebr fit` with a 4-bit (QLoRA) tiny model, and with 8-bit AdamW.

The demo configs plus `--model.init_args.policy.quantization`, and the shipped
configs/qlora-24gb shrunk to the tiny model, 2 steps each. With the demo configs the
4-bit matmuls compute in float32: bitsandbytes runs bfloat16 on CPU too, but casts
the frozen q/k/v biases to bfloat16 in place on the first forward, which rounds the
float32 tiny model's biases (the shipped configs load bfloat16 weights: no rounding)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from pebr_lightning.cli import main
from pebr_lightning.models.policy import LANGUAGE_PROJECTIONS

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo"
QUANTIZATION = json.dumps({"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"})
LORA = json.dumps({"r": 4, "alpha": 8, "dropout": 0.0})
# The tiny random model gives every completion of a group the same format score; this
# test reward adds spread so the LoRA weights do receive gradient (test_grpo_fit.py).
SPREAD = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}
LINEAR_4BIT = "bitsandbytes.nn.modules.Linear4bit"


class LinearTypes(L.Callback):
    """After every training step, writes `{module name: class}` of the policy's linears."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: JSON file: one `{name: "module.Class"}` mapping per training step.
        """
        self.path = Path(path)
        self.steps: list[dict[str, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(
            {
                name: f"{type(m).__module__}.{type(m).__name__}"
                for name, m in pl_module.policy.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        self.path.write_text(json.dumps(self.steps))


def fit(config: Path, tmp_path: Path, *extra: str) -> dict:
    """`pebr fit` for 2 steps; the parameter snapshot plus the linears' types per step."""
    snapshot, types = tmp_path / "snapshot.pt", tmp_path / "types.json"
    code = main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks+=pebr_demo.testing.ParameterSnapshot",
            f"--trainer.callbacks.path={snapshot}",
            f"--trainer.callbacks+={__name__}.LinearTypes",
            f"--trainer.callbacks.path={types}",
            *extra,
        ]
    )
    assert code == 0
    snap = torch.load(snapshot)
    snap["types"] = json.loads(types.read_text())
    return snap


def sft_args(shapes_data: dict[str, Path]) -> list[str]:
    return [
        "--data.init_args.train_manifest",
        str(shapes_data["train"]),
        "--data.init_args.val_manifest",
        str(shapes_data["val"]),
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]


def qlora_args() -> list[str]:
    return [
        "--model.init_args.policy.quantization",
        QUANTIZATION,
        "--model.init_args.policy.lora",
        LORA,
        "--model.init_args.policy.freeze_vision",
        "true",
    ]


def assert_4bit_language_model(types: list[dict[str, str]]) -> None:
    """Every step: language projections are bitsandbytes 4-bit under their LoRA
    wrapper; the vision tower and lm_head stay ordinary linears (the default)."""
    assert len(types) == 2
    pattern = re.compile(LANGUAGE_PROJECTIONS + r"\.base_layer")
    for step in types:
        quantized = {n for n, cls in step.items() if cls == LINEAR_4BIT}
        assert quantized == {n for n in step if pattern.fullmatch(n)}
        assert len(quantized) == 14  # 2 layers x 7 projections
        assert all(".visual." not in n and "lm_head" not in n for n in quantized)
        assert any(".visual." in n for n in step)  # vision linears exist, unquantized


def assert_only_lora_changed(snap: dict) -> None:
    """Compared as float32: bitsandbytes casts frozen biases to the compute dtype in
    place (exact for weights loaded in that dtype, as the shipped configs do)."""
    trainable = set(snap["trainable"])
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    four_bit = [n for n, t in snap["after"].items() if t.dtype == torch.uint8]
    assert len(four_bit) == 14  # the packed NF4 weights, recorded as uint8
    for name, before in snap["before"].items():
        after = snap["after"][name]
        changed = not torch.equal(before.float(), after.float())
        assert changed == (name in trainable), name
        if name in trainable:
            assert after.dtype == torch.float32, name  # the adapter trains in float32


def logged_rows(tmp_path: Path) -> list[dict[str, str]]:
    (metrics,) = tmp_path.rglob("metrics.csv")
    with metrics.open() as f:
        return list(csv.DictReader(f))


def assert_finite(rows: list[dict[str, str]]) -> None:
    assert rows
    for row in rows:
        for key, value in row.items():
            if value:
                assert math.isfinite(float(value)), (key, value)


def assert_adapter_written(tmp_path: Path) -> None:
    (adapter,) = [p for p in tmp_path.rglob("*.hf") if p.name == "last.hf"]
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()


def test_qlora_sft_trains_lora_on_a_4bit_model(tmp_path, shapes_data):
    snap = fit(
        DEMO / "sft.yaml",
        tmp_path,
        *sft_args(shapes_data),
        *qlora_args(),
        "--model.init_args.optim.name",
        "paged_adamw_8bit",
    )
    assert_4bit_language_model(snap["types"])
    assert_only_lora_changed(snap)
    rows = logged_rows(tmp_path)
    assert_finite(rows)
    assert [r["train/loss"] for r in rows if r.get("train/loss")]
    assert [r["val/loss"] for r in rows if r.get("val/loss")]
    assert_adapter_written(tmp_path)


def test_qlora_grpo_trains_lora_on_a_4bit_model(tmp_path, shapes_data):
    config = DEMO / "reasoning.yaml"
    rewards = yaml.safe_load(config.read_text())["model"]["init_args"]["rewards"]
    snap = fit(
        config,
        tmp_path,
        *qlora_args(),
        "--model.init_args.rewards",
        json.dumps([*rewards, SPREAD]),
        "--model.init_args.sampling.group_size",
        "4",
        "--model.init_args.sampling.max_new_tokens",
        "16",
        "--data.init_args.train_manifest",
        str(shapes_data["train"]),
        "--data.init_args.batch_size",
        "2",
        "--model.init_args.optim.name",
        "adamw_8bit",
    )
    assert_4bit_language_model(snap["types"])
    assert_only_lora_changed(snap)
    rows = logged_rows(tmp_path)
    assert_finite(rows)
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"reward/total/mean", "reward/vowel_share/mean"} <= logged
    assert_adapter_written(tmp_path)


def test_adamw_8bit_full_finetune_keeps_8bit_state(tmp_path, shapes_data):
    """Full fine-tuning of the tiny model: its matrices are big enough (>= 4,096
    elements) for 8-bit optimizer state, which LoRA's r=4 tensors are not."""
    snap = fit(
        DEMO / "sft.yaml",
        tmp_path,
        *sft_args(shapes_data),
        "--model.init_args.optim.name",
        "adamw_8bit",
    )
    assert set(snap["trainable"]) == set(snap["before"])
    for name in snap["trainable"]:
        assert not torch.equal(snap["before"][name], snap["after"][name]), name
    assert_finite(logged_rows(tmp_path))

    (ckpt,) = tmp_path.rglob("last.ckpt")
    (state,) = torch.load(ckpt, weights_only=False)["optimizer_states"]
    # bitsandbytes nests its state under one key so that FSDP leaves it alone.
    moments = [s["__bnb_optimizer_quant_state__"]["state1"] for s in state["state"].values()]
    assert {m.dtype for m in moments} == {torch.uint8, torch.float32}  # small ones stay fp32
    assert sum(m.dtype == torch.uint8 for m in moments) >= 10


@pytest.mark.parametrize("stage", ["sft", "reasoning"])
def test_shipped_qlora_24gb_config_trains_the_tiny_model(stage, tmp_path, shapes_data):
    """configs/qlora-24gb as shipped (bf16-mixed, bfloat16 weights and 4-bit matmuls,
    paged 8-bit AdamW, gradient checkpointing), shrunk to the tiny model and 2 steps.
    The perception stage differs only in rewards and data (FG-CLIP needs a download)."""
    config = REPO / "configs" / "qlora-24gb" / f"{stage}.yaml"
    if stage == "sft":
        extra = [*sft_args(shapes_data), "--trainer.accumulate_grad_batches", "1"]
        extra += ["--model.init_args.max_length", "512"]
    else:
        rewards = yaml.safe_load(config.read_text())["model"]["init_args"]["rewards"]
        extra = [
            "--model.init_args.rewards",
            json.dumps([*rewards, SPREAD]),
            "--model.init_args.sampling.max_new_tokens",
            "16",
            "--model.init_args.sampling.group_size",
            "4",
            "--data.init_args.train_manifest",
            str(shapes_data["train"]),
        ]
    snap = fit(
        config,
        tmp_path,
        "--model.init_args.policy.model",
        "tiny-qwen2.5-vl",
        "--data.init_args.num_workers",
        "0",
        *extra,
    )
    assert_4bit_language_model(snap["types"])
    assert_only_lora_changed(snap)
    assert_finite(logged_rows(tmp_path))
    assert_adapter_written(tmp_path)
