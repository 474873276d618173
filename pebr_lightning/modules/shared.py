"""Functions the SFT and GRPO modules share (house style: functions, not a base class)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def keep_trainable_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """With LoRA, keep only the trainable weights in a checkpoint.

    The frozen base is reloaded from the model name on resume, so a 7B LoRA
    checkpoint holds megabytes, not the whole model.
    """
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def load_policy(module: Any) -> Any:
    """Build the policy a module's settings describe (the modules share these names)."""
    from pebr_lightning.models.policy import build_policy

    return build_policy(
        module.model_name,
        lora=module.lora,
        quantization=module.quantization,
        freeze_vision=module.freeze_vision,
        dtype=module.dtype_name,
        gradient_checkpointing=module.gradient_checkpointing,
        trust_remote_code=module.trust_remote_code,
    )


def save_pretrained(policy: Any, processor: Any, path: str | Path) -> None:
    """Write the adapter (LoRA, PEFT format) or the full model, plus the processor."""
    policy.save_pretrained(str(path))
    processor.save_pretrained(str(path))
