"""build_policy: LoRA only on language-model projections, vision tower frozen."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pebr_lightning.data.collate import SFTCollator
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import (
    LoraConfig,
    QuantizationConfig,
    build_policy,
    load_processor,
    resolve_model_path,
    unwrap,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def lora_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_only_on_language_projections(family, family_path):
    policy = build_policy(str(family_path(family)), lora=LoraConfig(r=4, alpha=8))
    wrapped = lora_layers(policy.model)
    assert wrapped, "no LoRA layer was injected"
    for name in wrapped:
        assert ".language_model." in name and name.rsplit(".", 1)[-1] in PROJECTIONS, name
    # every language projection got one: 7 per decoder layer
    layers = unwrap(policy.model).config.text_config.num_hidden_layers
    assert len(wrapped) == 7 * layers
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_A" in n or "lora_B" in n) for n in trainable)
    assert not any(".visual." in n for n in trainable)


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_forward_on_a_real_batch(family, family_path):
    policy = build_policy(str(family_path(family)), lora=LoraConfig(r=4))
    record = {"id": "a", "question": "How many shapes are there?", "answer": "2"}
    batch = SFTCollator(policy.processor, PromptConfig())(
        [{"record": record, "image": Image.new("RGB", (112, 112), "white")}]
    )
    inputs = {k: v for k, v in batch.items() if k not in ("ids",)}
    loss = policy.model(**inputs).loss
    assert torch.isfinite(loss)


def test_full_finetune_freezes_vision_tower(tiny_path):
    model = build_policy(str(tiny_path), freeze_vision=True).model
    vision = {
        n: p.requires_grad for n, p in model.named_parameters() if n.startswith("model.visual.")
    }
    others = {
        n: p.requires_grad for n, p in model.named_parameters() if not n.startswith("model.visual.")
    }
    assert vision and not any(vision.values())  # patch embed, blocks and merger (projector)
    assert any("merger" in n for n in vision)
    assert others and all(others.values())


def test_unfrozen_vision_trains_everything(tiny_path):
    model = build_policy(str(tiny_path), freeze_vision=False).model
    assert all(p.requires_grad for p in model.parameters())


def test_four_bit_quantizes_language_model_only(tiny_path):
    import bitsandbytes as bnb

    policy = build_policy(
        str(tiny_path),
        lora=LoraConfig(r=4),
        quantization=QuantizationConfig(bits=4, compute_dtype="float32"),
    )
    base = unwrap(policy.model)
    four_bit = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(".language_model." in n for n in four_bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.model.visual.modules())
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_missing_local_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(PebrError, match=f"model folder {tmp_path / 'nope'} does not exist$"):
        build_policy(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "name",
    ["runs/nope/last.hf", "runs/nope", "./nope", "../nope", "~/nope", "nope.hf", "nope.ckpt"],
)
def test_a_path_that_is_not_there_says_so_in_every_loader(name, tmp_path, monkeypatch):
    """Not transformers' "Repo id must be in the form..." for something meant as a
    folder: `runs/nope` counts as one because `runs/` exists here."""
    (tmp_path / "work" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path))
    for load in (build_policy, load_processor, resolve_model_path):
        with pytest.raises(PebrError) as info:
            load(name)
        assert f"model folder {name} does not exist" in str(info.value)
        assert "Repo id" not in str(info.value)


def test_a_checkpoint_file_as_model_is_not_a_folder(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"not a folder")
    with pytest.raises(PebrError, match=r"last.ckpt: is a file, not a model folder.*pebr export"):
        build_policy(str(tmp_path / "last.ckpt"))


def test_hub_ids_and_existing_folders_pass_through(tiny_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert resolve_model_path("gpt2") == "gpt2"
    assert resolve_model_path(str(tiny_path)) == str(tiny_path)
    monkeypatch.setenv("HOME", str(tiny_path.parent))
    assert resolve_model_path(f"~/{tiny_path.name}") == str(tiny_path)
    # offline, a hub id fails in transformers, as a hub id (not as a missing folder)
    with pytest.raises(PebrError, match="cannot load model 'no-such-org/no-such-model'"):
        build_policy("no-such-org/no-such-model")


def test_adapter_folder_loads_its_base_with_the_adapter_merged(tiny_path, tmp_path):
    """A LoRA `.hf` folder as `model`: the base it names plus the adapter, merged, gives
    the same logits as the PEFT model that was saved; a new LoRA then wraps it."""
    from pebr_lightning.modules.shared import save_pretrained

    torch.manual_seed(0)
    built = build_policy(str(tiny_path), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # give the adapter weights that change the output
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    save_pretrained(built.model, built.processor, tmp_path / "adapter.hf")
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        want = built.model.eval()(input_ids=ids).logits
        base = unwrap(built.model)
        with built.model.disable_adapter():
            plain = base(input_ids=ids).logits

    merged = build_policy(str(tmp_path / "adapter.hf"))
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())
    with torch.no_grad():
        got = merged.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)

    again = build_policy(str(tmp_path / "adapter.hf"), lora=LoraConfig(r=4, alpha=8))
    trainable = [n for n, p in again.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_folder_with_a_broken_config_names_the_file_and_field(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(PebrError, match=r"adapter_config.json: .*'base_model_name_or_path'"):
        build_policy(str(tmp_path))
