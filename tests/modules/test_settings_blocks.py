"""GRPOModule's and SFTModule's settings as typed blocks: each checked once, handed
whole to its consumer, kept once; the former flat keys stop a config with one line."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest

from pebr_lightning.cli import main
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import LoraConfig, PolicySpec
from pebr_lightning.modules.grpo import GRPOModule
from pebr_lightning.modules.grpo_update import UpdateConfig
from pebr_lightning.modules.sft import SFTModule
from pebr_lightning.modules.shared import (
    FORMER_KEYS,
    POLICY_KEYS,
    STILL_FLAT,
    UPDATE_KEYS,
    move_former_keys,
)

REPO = Path(__file__).resolve().parents[2]


def test_the_modules_take_blocks_not_the_former_flat_arguments():
    for cls in (GRPOModule, SFTModule):
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert params.isdisjoint(FORMER_KEYS[cls.__name__]), cls
        assert typing.get_type_hints(cls.__init__)["policy"] is PolicySpec
    assert typing.get_type_hints(GRPOModule.__init__)["update"] is UpdateConfig
    assert len(inspect.signature(GRPOModule.__init__).parameters) - 1 == 13
    # a key taken flat by one module and moved by another is the only kind not checked
    # on a command line, and every such key is listed
    flat = {k for cls in (GRPOModule, SFTModule) for k in inspect.signature(cls).parameters}
    moved = {k for keys in FORMER_KEYS.values() for k in keys}
    assert flat & moved == STILL_FLAT


def test_each_block_is_kept_once_and_handed_whole(tiny_path):
    update = UpdateConfig(micro_batch_size=4, prompts_per_update=1, max_grad_norm=0.5)
    module = GRPOModule(
        policy=PolicySpec(model=str(tiny_path), lora=LoraConfig(r=4)),
        rewards=[{"name": "format"}],
        update=update,
    )
    assert module.update_settings.update is update and module.update_cfg is update
    assert module.update_settings.loss is module.loss_cfg
    for former in UPDATE_KEYS + POLICY_KEYS:  # no copies of block fields on the module
        assert former not in vars(module), former
    assert module.policy_spec.lora == LoraConfig(r=4)


def test_an_unset_freeze_vision_keeps_each_modules_former_default(tiny_path):
    spec = PolicySpec(model=str(tiny_path))
    assert spec.freeze_vision is None
    grpo = GRPOModule(policy=spec, rewards=[{"name": "format"}])
    assert grpo.policy_spec.freeze_vision is False  # the paper's RL trains the tower
    assert SFTModule(policy=spec).policy_spec.freeze_vision is True  # its SFT does not
    frozen = PolicySpec(model=str(tiny_path), freeze_vision=True)
    assert GRPOModule(policy=frozen, rewards=[{"name": "format"}]).policy_spec.freeze_vision


def test_blocks_check_their_values_where_they_are_built():
    with pytest.raises(PebrError, match=r"update.micro_batch_size must be >= 1, got 0"):
        UpdateConfig(micro_batch_size=0)
    with pytest.raises(PebrError, match=r"update.max_grad_norm must be > 0"):
        UpdateConfig(max_grad_norm=0.0)
    with pytest.raises(PebrError, match=r"policy has unknown key\(s\) \['lr'\]; its keys: model"):
        PolicySpec.parse({"model": "m", "lr": 1})
    assert PolicySpec.parse({"model": "m", "lora": {"r": 4}}).lora == LoraConfig(r=4)


def test_former_hyper_parameters_move_into_their_blocks():
    old = {"model": "m", "lora": {"r": 4}, "micro_batch_size": 2, "logprob_chunk_size": 64}
    grpo = move_former_keys(old, "GRPOModule")
    assert grpo == {
        "policy": {"model": "m", "lora": {"r": 4}},
        "update": {"micro_batch_size": 2, "logprob_chunk_size": 64},
    }
    sft = move_former_keys(old, "SFTModule")  # SFT still takes logprob_chunk_size flat
    assert sft["policy"] == {"model": "m", "lora": {"r": 4}} and sft["logprob_chunk_size"] == 64
    current = {"policy": PolicySpec(model="m"), "rewards": []}
    assert move_former_keys(current, "GRPOModule") == current


def test_a_config_with_a_former_key_stops_naming_file_line_and_new_key(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    text = (REPO / "configs" / "demo" / "reasoning.yaml").read_text()
    text = text.replace("    policy:\n", "    micro_batch_size: 4\n    policy:\n", 1)
    config.write_text(text)
    line = text.splitlines().index("    micro_batch_size: 4") + 1
    assert main(["fit", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"error: {config}:{line}: model.init_args.micro_batch_size moved into the update "
        "block (2026-12-06): write model.init_args.update.micro_batch_size\n"
    )
    sft = REPO / "configs" / "demo" / "sft.yaml"
    assert main(["fit", "--config", str(sft), "--model.init_args.lora", "null"]) == 2
    assert capsys.readouterr().err == (
        "error: --model.init_args.lora moved into the policy block (2026-12-06): write "
        "--model.init_args.policy.lora\n"
    )
    # an SFT config's own logprob_chunk_size is not a former key there
    old_sft = tmp_path / "sft.yaml"
    old_sft.write_text(sft.read_text().replace("    policy:\n", "    model: x\n    policy:\n", 1))
    assert main(["fit", "--config", str(old_sft)]) == 2
    assert "model.init_args.model moved into the policy block" in capsys.readouterr().err


def test_an_sft_config_keeps_its_flat_logprob_chunk_size(tmp_path, shapes_data):
    from pebr_lightning.cli import cli

    sft = REPO / "configs" / "demo" / "sft.yaml"
    built = cli(
        [
            "--config", str(sft),
            "--model.init_args.logprob_chunk_size", "64",
            "--data.init_args.train_manifest", str(shapes_data["train"]),
            "--trainer.default_root_dir", str(tmp_path),
        ],
        run=False,
    )  # fmt: skip
    assert built.model.logprob_chunk_size == 64
    assert built.model.policy_spec.freeze_vision is False  # configs/demo/sft.yaml trains it


def test_a_block_field_set_to_null_on_the_command_line_keeps_the_other_fields(shapes_data):
    """`--model.init_args.policy.lora null` (jsonargparse alone refuses a null for an
    optional dataclass inside a dataclass) turns LoRA off and keeps the config's model."""
    from pebr_lightning.cli import cli

    built = cli(
        [
            "--config", str(REPO / "configs" / "demo" / "reasoning.yaml"),
            "--model.init_args.policy.lora", '{"r": 4}',
            "--model.init_args.policy.lora", "null",
            "--model.init_args.policy.dtype=null",
            "--data.init_args.train_manifest", str(shapes_data["train"]),
        ],
        run=False,
    )  # fmt: skip
    spec = built.model.policy_spec
    assert spec.lora is None and spec.dtype is None and spec.model == "tiny-qwen2.5-vl"
    assert spec.freeze_vision is True  # configs/demo/reasoning.yaml's, kept
