"""The second model family end to end: the toy Gemma 3 (`tiny-gemma3`, built by the
demo package) through warm-up SFT, GRPO, `pebr eval`, `pebr sample` and `pebr export`.
Nothing in pebr_lightning names it but its family module (models/families/gemma3.py)
and that module's entry point; the configs are the demo's, with the model swapped."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pebr_lightning.cli import main
from pebr_lightning.models.families import family_of
from pebr_lightning.models.families.gemma3 import Gemma3

REPO = Path(__file__).resolve().parents[2]
SPREAD = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}


@pytest.fixture(scope="module")
def gemma(pebr_cache) -> Path:
    from pebr_demo.models.tiny_gemma3 import ensure_tiny_gemma3

    return ensure_tiny_gemma3()


def snapshot_args(path: Path) -> list[str]:
    return [
        "--trainer.callbacks+=pebr_demo.testing.ParameterSnapshot",
        f"--trainer.callbacks.path={path}",
    ]


def changed(snapshot: Path) -> set[str]:
    snap = torch.load(snapshot)
    return {n for n, before in snap["before"].items() if not torch.equal(before, snap["after"][n])}


def finite_metrics(root: Path) -> set[str]:
    (metrics,) = root.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    for row in rows:
        for key, value in row.items():
            if value:
                assert math.isfinite(float(value)), (key, value)
    return {k for row in rows for k, v in row.items() if v}


def test_the_toy_gemma3_is_a_gemma3_the_family_serves(gemma):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gemma)
    assert config.model_type == "gemma3"
    assert isinstance(family_of(config), Gemma3)


def test_tiny_gemma3_through_sft_grpo_eval_sample_and_export(gemma, shapes_data, tmp_path):
    sft_root, sft_snap = tmp_path / "sft", tmp_path / "sft.pt"
    code = main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "demo" / "sft.yaml"),
            "--model.init_args.policy.model",
            "tiny-gemma3",
            "--model.init_args.optim.lr_scale",
            "{vision_tower: 0.1}",  # Gemma's tower is not `visual`: the key must match it
            "--data.init_args.train_manifest",
            str(shapes_data["train"]),
            "--data.init_args.val_manifest",
            "null",
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.num_workers",
            "0",
            "--trainer.max_steps",
            "3",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(sft_root),
            *snapshot_args(sft_snap),
        ]
    )
    assert code == 0
    moved = changed(sft_snap)
    assert any(".vision_tower." in n for n in moved) and any(".language_model." in n for n in moved)
    assert "train/loss" in finite_metrics(sft_root)
    (sft_hf,) = sft_root.rglob("last.hf")

    grpo_root, grpo_snap = tmp_path / "grpo", tmp_path / "grpo.pt"
    config = REPO / "configs" / "demo" / "perception.yaml"
    rewards = yaml.safe_load(config.read_text())["model"]["init_args"]["rewards"]
    code = main(
        [
            "fit",
            "--config",
            str(config),
            "--model.init_args.policy.model",
            str(sft_hf),
            "--model.init_args.rewards",
            json.dumps([*rewards, SPREAD]),
            "--model.init_args.loss.trained_section",
            "all",
            "--model.init_args.sampling.group_size",
            "4",
            "--model.init_args.sampling.max_new_tokens",
            "16",
            "--data.init_args.train_manifest",
            str(shapes_data["train"]),
            "--data.init_args.batch_size",
            "2",
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(grpo_root),
            *snapshot_args(grpo_snap),
        ]
    )
    assert code == 0
    moved = changed(grpo_snap)
    assert any(".vision_tower." in n for n in moved) and any(".language_model." in n for n in moved)
    logged = finite_metrics(grpo_root)
    assert {"reward/total/mean", "train/loss"} <= logged
    (grpo_ckpt,) = grpo_root.rglob("last.ckpt")
    grpo_hf = grpo_ckpt.with_suffix(".hf")

    common = ["--model", str(grpo_hf), "--no-progress"]
    evaluate = ["eval", *common, "--manifest", str(shapes_data["val"]), "--limit", "4"]
    assert main([*evaluate, "--max-new-tokens", "8", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["engine"] == "hf"

    sample = ["sample", *common, "--manifest", str(shapes_data["train"]), "--k", "2"]
    sample += ["--limit", "3", "--max-new-tokens", "6", "--out", str(tmp_path / "sample")]
    assert main(sample) == 0
    summary = json.loads((tmp_path / "sample" / "summary.json").read_text())
    assert sum(summary["counts"].values()) == 3

    out = tmp_path / "export"
    assert main(["export", str(grpo_ckpt), "--out", str(out), "--dtype", "float32"]) == 0
    from transformers import AutoModelForImageTextToText, AutoProcessor

    (merged,) = [p for p in out.iterdir() if (p / "model.safetensors").is_file()]
    exported = AutoModelForImageTextToText.from_pretrained(merged, local_files_only=True)
    trained = AutoModelForImageTextToText.from_pretrained(grpo_hf, local_files_only=True)
    assert exported.config.model_type == "gemma3"
    processor = AutoProcessor.from_pretrained(merged, local_files_only=True)
    from PIL import Image

    from pebr_lightning.data.manifest import load_manifest

    record = load_manifest(shapes_data["val"]).records[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[Image.open(record["image"])]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, trained(**inputs).logits)
