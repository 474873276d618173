"""A LoRA adapter folder whose adapter_model.bin is a crafted pickle is refused with
one line that says why, never with torch's advice to load it unsafely."""

from __future__ import annotations

import torch

from pebr_demo.testing import TouchPayload
from pebr_lightning.cli import main
from pebr_lightning.models.policy import LoraConfig, build_policy


def test_a_pickled_adapter_is_refused_without_unsafe_advice(
    tiny_path, shapes_data, tmp_path, capsys
) -> None:
    """Before: the refusal reached the user as torch's message, whose advice is to
    retry with weights_only=False: what runs the payload."""
    built = build_policy(str(tiny_path), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    adapter = tmp_path / "adapter"
    built.model.save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file()
    marker = tmp_path / "ran"
    torch.save({"base_model.model.x": TouchPayload(marker)}, adapter / "adapter_model.bin")
    capsys.readouterr()
    code = main(
        ["eval", "--model", str(adapter), "--manifest", str(shapes_data["val"]),
         "--out", str(tmp_path / "out"), "--limit", "2", "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert err.startswith(f"error: cannot load the adapter in {adapter}: ")
    assert "weights_only=False" not in err and "Traceback" not in err
    assert not marker.exists()
