"""Every shipped YAML instantiates through the CLI (recursive glob: none is left out)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml

from pebr_lightning.cli import cli

REPO = Path(__file__).resolve().parents[1]
ALL = sorted((REPO / "configs").rglob("*.yaml"))
# Schedule files drive `pebr schedule`, not LightningCLI: checked by their own test below.
SCHEDULES = [p for p in ALL if p.read_text().startswith("# pebr schedule")]
CONFIGS = [p for p in ALL if p not in SCHEDULES]


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
    schedules = {str(p.relative_to(REPO / "configs")) for p in SCHEDULES}
    assert {"schedule.yaml", "demo/schedule.yaml", "demo/ablation.yaml"} <= schedules


@pytest.mark.parametrize("path", SCHEDULES, ids=lambda p: str(p.relative_to(REPO)))
def test_schedule_file_loads_and_its_stage_configs_exist(path: Path):
    from pebr_lightning.schedule.config import load_schedule

    schedule = load_schedule(path)
    assert schedule.stage_names
    for stage in schedule.fit.values():
        assert (REPO / stage.config).is_file(), stage.config
        assert (REPO / stage.config).resolve() in {p.resolve() for p in CONFIGS}


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


def test_make_demo_runs_the_full_schedule_with_shorter_rl_only():
    """`make demo` (configs/demo/quick.yaml) is the benchmark's schedule with shorter RL:
    same data, SFT and evaluation, so its table has the same columns and its SFT row the
    same recipe; only the fields its header names differ."""
    makefile = (REPO / "Makefile").read_text()
    assert "DEMO_CONFIG ?= configs/demo/quick.yaml" in makefile
    full = yaml.safe_load((REPO / "configs/demo/schedule.yaml").read_text())
    quick = yaml.safe_load((REPO / "configs/demo/quick.yaml").read_text())
    changed = {
        ("out",): ("runs/demo/schedule", "runs/demo/quick"),
        ("stages", "sample", "limit"): (1500, 800),
        ("stages", "perception", "args"): (
            ["--trainer.max_steps=200"],
            ["--trainer.max_steps=100"],
        ),
        ("stages", "reasoning", "args"): (["--trainer.max_steps=300"], ["--trainer.max_steps=100"]),
    }

    def leaves(tree, path=()):
        if isinstance(tree, dict):
            for key, value in tree.items():
                yield from leaves(value, (*path, key))
        else:
            yield path, tree

    full_leaves, quick_leaves = dict(leaves(full)), dict(leaves(quick))
    assert full_leaves.keys() == quick_leaves.keys()
    differ = {
        k: (full_leaves[k], quick_leaves[k])
        for k in full_leaves
        if full_leaves[k] != quick_leaves[k]
    }
    assert differ == changed
