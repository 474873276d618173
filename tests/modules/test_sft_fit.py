"""End to end: `pebr fit` on the demo config, full fine-tune and LoRA."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from pebr_lightning.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo" / "sft.yaml")


def fit_demo(tmp_path: Path, shapes_data: dict[str, Path], *extra: str) -> dict:
    snapshot = tmp_path / "snapshot.pt"
    code = main(
        [
            "fit",
            "--config",
            DEMO,
            "--data.init_args.train_manifest",
            str(shapes_data["train"]),
            "--data.init_args.val_manifest",
            str(shapes_data["val"]),
            "--data.init_args.batch_size",
            "8",
            "--data.init_args.num_workers",
            "0",
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks+=pebr_demo.testing.ParameterSnapshot",
            f"--trainer.callbacks.path={snapshot}",
            *extra,
        ]
    )
    assert code == 0
    return torch.load(snapshot)


def logged(tmp_path: Path, key: str) -> list[float]:
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_full_finetune_changes_every_weight(tmp_path, shapes_data):
    snap = fit_demo(tmp_path, shapes_data)
    assert set(snap["trainable"]) == set(snap["before"])  # demo trains vision too
    for name in snap["trainable"]:
        assert not torch.equal(snap["before"][name], snap["after"][name]), name
    losses = logged(tmp_path, "train/loss")
    assert losses and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(v) for v in logged(tmp_path, "val/loss"))
    # the full model is saved next to the checkpoint, loadable by plain transformers
    (hf,) = [p for p in tmp_path.rglob("*.hf") if p.name == "last.hf"]
    reloaded = AutoModelForImageTextToText.from_pretrained(hf, local_files_only=True)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(reloaded.state_dict()[name], snap["after"][f"policy.{name}"])


def test_lora_trains_adapter_only_and_saves_peft_adapter(tmp_path, shapes_data, tiny_path):
    from peft import PeftModel

    snap = fit_demo(
        tmp_path,
        shapes_data,
        "--model.init_args.policy.lora",
        '{"r": 4, "alpha": 8, "dropout": 0.0}',
        "--model.init_args.policy.freeze_vision",
        "true",
    )
    trainable = set(snap["trainable"])
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    for name, before in snap["before"].items():
        changed = not torch.equal(before, snap["after"][name])
        assert changed == (name in trainable), name

    (adapter,) = [p for p in tmp_path.rglob("*.hf") if p.name == "last.hf"]
    assert (adapter / "adapter_config.json").is_file()
    base = AutoModelForImageTextToText.from_pretrained(tiny_path, local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, adapter)
    loaded = dict(peft_model.named_parameters())
    checked = 0
    for name in trainable:
        key = name.removeprefix("policy.").replace(".default.", ".default.")
        if key in loaded:
            torch.testing.assert_close(loaded[key], snap["after"][name])
            checked += 1
    assert checked == len(trainable)

    # the Lightning checkpoint holds the adapter weights only, not the frozen base
    ckpt = torch.load(adapter.with_suffix(".ckpt"), weights_only=False)
    assert set(ckpt["state_dict"]) == trainable


@pytest.mark.parametrize("flag", ["--model.help", "--data.help"])
def test_help_shows_parameter_docstrings(flag, capsys):
    target = {
        "--model.help": "pebr_lightning.modules.sft.SFTModule",
        "--data.help": "pebr_lightning.data.datamodule.ManifestDataModule",
    }[flag]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", flag, target])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    if flag == "--model.help":
        assert "LoRA adapter settings; None trains every weight" in out  # the policy block
        assert "Peak learning rate" in out  # dataclass field docstrings too
        assert "Cosine floor as a fraction of lr" in out
    else:
        assert "drop records that fail validation" in out
