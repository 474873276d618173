"""Every shipped YAML instantiates through the CLI (recursive glob: none is left out)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml

from pebr_lightning.cli import cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    assert {
        "sft.yaml",
        "perception.yaml",
        "reasoning.yaml",
        "demo/sft.yaml",
        "demo/perception.yaml",
        "demo/reasoning.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_instantiates(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# pebr "), f"{path} must open with the command that runs it"
    command = first.removeprefix("# ").split()
    subcommand = command[1]
    raw = yaml.safe_load(path.read_text())
    assert subcommand in {"fit", "validate", "test", "predict"}
    built = cli(["--config", str(path)], run=False)  # run=False parses without a subcommand
    assert (
        type(built.model).__module__ + "." + type(built.model).__name__
        == (raw["model"]["class_path"])
    )
    assert isinstance(built.trainer, L.Trainer)
    assert isinstance(built.datamodule, L.LightningDataModule)
    # nothing heavy happened: the policy loads lazily in configure_model
    assert getattr(built.model, "policy", None) is None
    # every reward the config names resolves and accepts its init_args (models load lazily)
    specs = getattr(built.model, "reward_specs", None)
    if specs is not None:
        from pebr_lightning.rewards.combine import load_rewards

        names = load_rewards(specs).names
        assert len(names) == len(raw["model"]["init_args"]["rewards"])
