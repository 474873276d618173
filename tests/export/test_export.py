"""`pebr export` on real checkpoints of the tiny model: LoRA SFT, GRPO, a sharded folder.

Each exported folder is loaded with plain transformers / peft (no pebr code) and
compared with the run's own `.hf` adapter on a processor-built image + text input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from pebr_lightning.cli import main

REPO = Path(__file__).resolve().parents[2]
LORA = '{"r": 4, "alpha": 8, "dropout": 0.0}'
# The tiny random model gives a group identical built-in scores; this reward adds
# spread so GRPO's LoRA weights do move (as in tests/modules/test_grpo_fit.py).
SPREAD = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, shapes_data) -> Path:
    """last.ckpt of a 2-step LoRA SFT run; lr high enough that the adapter visibly moves."""
    root = tmp_path_factory.mktemp("sft")
    code = main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "demo" / "sft.yaml"),
            "--model.init_args.policy.lora",
            LORA,
            "--model.init_args.policy.freeze_vision",
            "true",
            "--model.init_args.optim.lr",
            "1e-2",
            "--model.init_args.optim.warmup_steps",
            "0",
            "--data.init_args.train_manifest",
            str(shapes_data["train"]),
            "--data.init_args.val_manifest",
            str(shapes_data["val"]),
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.num_workers",
            "0",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.default_root_dir",
            str(root),
        ]
    )
    assert code == 0
    (ckpt,) = root.rglob("last.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def sft_export(sft_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft-export") / "export"
    assert main(["export", str(sft_ckpt), "--out", str(out), "--dtype", "float32"]) == 0
    return out


def test_lora_sft_export_loads_in_transformers_and_peft(
    sft_ckpt, sft_export, tiny_path, shapes_data
):
    from peft import PeftModel

    adapter, merged = sft_export / "adapter", sft_export / "merged"
    assert sorted(p.name for p in sft_export.iterdir()) == ["adapter", "merged"]
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert not any("lora" in k for k in load_file(merged / "model.safetensors"))

    inputs = image_text_inputs(merged, shapes_data["val"])
    merged_model = AutoModelForImageTextToText.from_pretrained(merged, local_files_only=True)
    assert merged_model.dtype == torch.float32
    from_adapter = PeftModel.from_pretrained(base_model(tiny_path), adapter)
    trained = PeftModel.from_pretrained(base_model(tiny_path), sft_ckpt.with_suffix(".hf"))

    reference = logits(trained, inputs)
    torch.testing.assert_close(logits(from_adapter, inputs), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(merged_model, inputs), reference, rtol=0, atol=1e-4)
    moved = (logits(base_model(tiny_path), inputs) - reference).abs().max()
    assert moved > 1e-2  # training changed the outputs far beyond the tolerance above


def test_grpo_export_in_default_dtype(tmp_path, shapes_data, tiny_path):
    from peft import PeftModel

    config = REPO / "configs" / "demo" / "perception.yaml"
    rewards = yaml.safe_load(config.read_text())["model"]["init_args"]["rewards"]
    code = main(
        [
            "fit",
            "--config",
            str(config),
            "--model.init_args.rewards",
            json.dumps([*rewards, SPREAD]),
            "--model.init_args.policy.lora",
            LORA,
            "--model.init_args.optim.lr",
            "1e-2",
            "--model.init_args.sampling.group_size",
            "4",
            "--model.init_args.sampling.max_new_tokens",
            "8",
            "--data.init_args.train_manifest",
            str(shapes_data["train"]),
            "--data.init_args.batch_size",
            "2",
            "--trainer.max_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    (ckpt,) = tmp_path.rglob("last.ckpt")
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0

    # the adapter holds exactly the checkpoint's LoRA weights
    stored = torch.load(ckpt, weights_only=True)["state_dict"]
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(stored)
    for name, value in stored.items():
        key = name.removeprefix("policy.").replace(".default.", ".")
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)

    # merged: bfloat16 (the run kept float32 weights and set no dtype), and the same
    # weights as peft merging the run's own .hf folder into the bfloat16 base
    assert json.loads((out / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForImageTextToText.from_pretrained(out / "merged", local_files_only=True)
    assert model.dtype == torch.bfloat16
    merged = model.state_dict()
    bf16_base = base_model(tiny_path, dtype=torch.bfloat16)
    expected = PeftModel.from_pretrained(bf16_base, ckpt.with_suffix(".hf")).merge_and_unload()
    expected = expected.state_dict()
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=0)
    base = base_model(tiny_path).state_dict()
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], base[name].to(torch.bfloat16))
    inputs = image_text_inputs(out / "merged", shapes_data["val"])
    assert torch.isfinite(logits(model, inputs)).all()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_folder_exports_the_same(sft_ckpt, sft_export, tmp_path):
    """A folder laid out as ModelParallelStrategy(save_distributed_checkpoint=True) writes
    it, whose meta.pt holds the config dataclasses of a run built in Python (no class
    path recorded), exports the same weights as the .ckpt file."""
    import torch.distributed.checkpoint as dcp

    from pebr_lightning.data.prompts import PromptConfig
    from pebr_lightning.models.policy import PolicySpec
    from pebr_lightning.modules.optim import OptimConfig

    checkpoint = torch.load(sft_ckpt, weights_only=True)
    state = checkpoint.pop("state_dict")
    checkpoint.pop("optimizer_states")
    hparams = checkpoint["hyper_parameters"]
    for key in ("_class_path", "_instantiator"):
        hparams.pop(key)
    hparams["policy"] = PolicySpec.parse(hparams["policy"])  # a mapping -> the dataclass
    hparams["prompt"] = PromptConfig(**hparams["prompt"])
    hparams["optim"] = OptimConfig(**hparams["optim"])
    folder = tmp_path / "last.ckpt"
    optimizer = {  # FSDP2 optimizer state: keyed by parameter name
        "state": {
            n: {"exp_avg": torch.ones_like(t), "step": torch.tensor(2.0)} for n, t in state.items()
        },
        "param_groups": [{"lr": 1e-2, "params": sorted(state)}],
    }
    dcp.save({"state_dict": state, "optimizer_0": optimizer}, checkpoint_id=folder)
    torch.save(checkpoint, folder / "meta.pt")

    out = tmp_path / "export"
    assert main(["export", str(folder), "--out", str(out), "--dtype", "float32"]) == 0
    for sub in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        ours, reference = load_file(out / sub), load_file(sft_export / sub)
        assert ours.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0)


def test_full_finetune_checkpoint_exports_its_weights(sft_ckpt, tiny_path, tmp_path, capsys):
    """lora null: the checkpoint holds the whole policy, which becomes OUT/merged, said
    as such (no adapter was merged); the files are as readable as the umask allows
    (safetensors alone would leave model.safetensors 0o600)."""
    checkpoint = torch.load(sft_ckpt, weights_only=True)
    set_policy(checkpoint["hyper_parameters"], lora=None)
    policy = base_model(tiny_path).state_dict()
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    policy[name] = policy[name] + 1.0  # stands in for training
    checkpoint["state_dict"] = {f"policy.{k}": v for k, v in policy.items()}
    torch.save(checkpoint, tmp_path / "full.ckpt")

    out = tmp_path / "out"
    old_umask = os.umask(0o022)
    try:
        argv = ["export", str(tmp_path / "full.ckpt"), "--out", str(out), "--dtype", "float32"]
        assert main(argv) == 0
    finally:
        os.umask(old_umask)
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {out / 'merged'} (sft policy, full fine-tuned weights, float32)"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["merged"]
    assert stat.S_IMODE((out / "merged" / "model.safetensors").stat().st_mode) == 0o644
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o644}
    assert stat.S_IMODE((out / "merged").stat().st_mode) == 0o755
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged", local_files_only=True)
    torch.testing.assert_close(merged.state_dict()[name], policy[name], rtol=0, atol=0)


def test_qlora_checkpoint_exports_unquantized_in_its_compute_dtype(sft_ckpt, tmp_path, capsys):
    quantization = {"bits": 4, "compute_dtype": "float16"}
    qlora = rewrite(sft_ckpt, tmp_path / "qlora.ckpt", policy={"quantization": quantization})
    out = tmp_path / "out"
    assert main(["export", str(qlora), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {out / 'adapter'} (LoRA adapter, PEFT format, with the processor)",
        f"wrote {out / 'merged'} (sft policy, LoRA adapter merged into its base, float16)",
    ]
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["dtype"] == "float16" and "quantization_config" not in config


def test_a_grpo_checkpoint_exports_without_its_reward_plugins(sft_ckpt, tmp_path, capsys):
    """Export runs no reward: a run's reward that is not installed here (a plugin left
    on the training machine) does not stop it, though a config naming it would."""
    checkpoint = torch.load(sft_ckpt, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    hparams.pop("max_length")  # the one SFTModule argument GRPOModule does not take
    hparams["_class_path"] = "pebr_lightning.modules.grpo.GRPOModule"
    hparams["rewards"] = [{"name": "format"}, {"name": "plugin_left_behind", "weight": 0.5}]
    torch.save(checkpoint, tmp_path / "grpo.ckpt")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "grpo.ckpt"), "--out", str(out), "--no-merge"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("class_path", ["os.system", "pebr_export_probe.EvilModule"])
def test_unknown_class_path_is_refused_without_import(
    class_path, sft_ckpt, tmp_path, monkeypatch, capsys
):
    # importing the probe module would leave a marker file behind
    marker = tmp_path / "imported"
    (tmp_path / "pebr_export_probe.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass EvilModule: ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = rewrite(sft_ckpt, tmp_path / "bad.ckpt", _class_path=class_path)

    assert main(["export", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and repr(class_path) in err
    assert not marker.exists() and "pebr_export_probe" not in sys.modules
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint_names_the_file(sft_ckpt, tmp_path, capsys):
    cut = tmp_path / "cut.ckpt"
    data = sft_ckpt.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert main(["export", str(cut), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{cut}: cannot read the checkpoint" in err


def test_foreign_objects_remote_code_and_mismatched_weights_are_errors(sft_ckpt, tmp_path, capsys):
    import argparse

    foreign = rewrite(sft_ckpt, tmp_path / "foreign.ckpt", prompt=argparse.Namespace(a=1))
    assert main(["export", str(foreign), "--out", str(tmp_path / "out")]) == 2
    assert "argparse.Namespace" in capsys.readouterr().err

    remote = rewrite(sft_ckpt, tmp_path / "remote.ckpt", policy={"trust_remote_code": True})
    assert main(["export", str(remote), "--out", str(tmp_path / "out")]) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err

    checkpoint = torch.load(sft_ckpt, weights_only=True)
    dropped = sorted(checkpoint["state_dict"])[0]
    del checkpoint["state_dict"][dropped]
    torch.save(checkpoint, tmp_path / "partial.ckpt")
    assert main(["export", str(tmp_path / "partial.ckpt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "1 missing" in err and dropped in err
    assert not (tmp_path / "out").exists()


def test_existing_out_is_kept_unless_overwrite(sft_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(sft_ckpt), "--out", str(out), "--no-merge"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    assert main(["export", str(sft_ckpt), "--out", str(out), "--no-merge", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left behind


def test_safe_globals_cover_every_config_class_of_the_modules():
    from pebr_lightning.export.export import ALLOWED_MODULES, _module_class, _safe_globals

    found: set[type] = set()

    def collect(hint) -> None:  # dataclasses in a hint, and in their fields' hints
        for option in [hint, *typing.get_args(hint)]:
            for inner in [option, *typing.get_args(option)]:
                new = inner not in found
                if isinstance(inner, type) and dataclasses.is_dataclass(inner) and new:
                    found.add(inner)
                    for field_hint in typing.get_type_hints(inner).values():
                        collect(field_hint)

    for kind in ALLOWED_MODULES.values():
        for hint in typing.get_type_hints(_module_class(kind).__init__).values():
            collect(hint)
    assert found == set(_safe_globals())


# -- helpers --------------------------------------------------------------------------------


def rewrite(source: Path, target: Path, policy: dict | None = None, **hparams) -> Path:
    """`source` with hyper-parameters replaced (`policy`: fields of its policy block)."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["hyper_parameters"].update(hparams)
    set_policy(checkpoint["hyper_parameters"], **(policy or {}))
    torch.save(checkpoint, target)
    return target


def set_policy(hparams: dict, **changes) -> None:
    """Change fields of the policy block a run saved (a PolicySpec or a mapping)."""
    from pebr_lightning.models.policy import PolicySpec

    hparams["policy"] = dataclasses.replace(PolicySpec.parse(hparams["policy"]), **changes)


def base_model(tiny_path: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForImageTextToText.from_pretrained(
        tiny_path, dtype=dtype, local_files_only=True
    )


def image_text_inputs(folder: Path, manifest: Path) -> dict:
    """A manifest's first image and question through the exported folder's own processor."""
    record = json.loads(manifest.read_text().splitlines()[0])
    image = Image.open(manifest.parent / record["image"]).convert("RGB")
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": record["question"]}],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model.eval()(**inputs).logits.float()


def test_the_policy_spec_is_recorded_by_value(sft_ckpt):
    """The checkpoint holds the PolicySpec it trained as plain values (it loads with
    weights_only and no allow-list), equal to the one its hyper-parameters rebuild."""
    from pebr_lightning.export.export import build_module, read_checkpoint
    from pebr_lightning.models.policy import LoraConfig, PolicySpec, QuantizationConfig

    spec = PolicySpec("x", lora=LoraConfig(r=4), quantization=QuantizationConfig(), dtype="float32")
    assert PolicySpec.from_dict(spec.to_dict()) == spec
    recorded = torch.load(sft_ckpt, weights_only=True)["pebr_policy"]
    ckpt = read_checkpoint(sft_ckpt)
    assert PolicySpec.from_dict(recorded) == build_module("sft", ckpt).policy_spec
    assert recorded["lora"]["r"] > 0


@pytest.mark.parametrize("former", ["modules.grpo", "modules.grpo_update"])
def test_a_checkpoint_naming_the_loss_config_where_it_used_to_live_still_loads(
    former, tmp_path, monkeypatch
):
    """GRPOLossConfig moved from modules/grpo.py to modules/grpo_update.py, then to
    algorithms/loss_config.py; checkpoints written before name an old place, which
    export's restricted loader still allows."""
    from pebr_lightning.algorithms.loss_config import GRPOLossConfig
    from pebr_lightning.export.export import _torch_load

    path = tmp_path / "old.ckpt"
    # pickle records a class by its __module__: as a checkpoint of that time did
    monkeypatch.setattr(GRPOLossConfig, "__module__", f"pebr_lightning.{former}")
    torch.save({"hyper_parameters": {"loss": GRPOLossConfig(beta=0.05)}}, path)
    monkeypatch.undo()
    assert f"pebr_lightning.{former}\nGRPOLossConfig".encode() in path.read_bytes()
    loaded = _torch_load(path)
    assert loaded["hyper_parameters"]["loss"] == GRPOLossConfig(beta=0.05)


def test_a_checkpoint_with_the_former_flat_keys_still_exports_the_same(
    sft_ckpt, sft_export, tmp_path
):
    """Checkpoints saved before the settings blocks (2026-12-06) hold model, lora,
    freeze_vision, ... as flat hyper-parameters: export moves them into the policy block
    and writes the same weights."""
    checkpoint = torch.load(sft_ckpt, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    from pebr_lightning.models.policy import PolicySpec

    policy = PolicySpec.parse(hparams.pop("policy"))
    hparams.update(dataclasses.asdict(policy))  # model, lora (a mapping), ... flat
    assert "lora" in hparams and "policy" not in hparams
    torch.save(checkpoint, tmp_path / "old.ckpt")
    out = tmp_path / "export"
    assert (
        main(["export", str(tmp_path / "old.ckpt"), "--out", str(out), "--dtype", "float32"]) == 0
    )
    for sub in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        ours, reference = load_file(out / sub), load_file(sft_export / sub)
        assert ours.keys() == reference.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0)
