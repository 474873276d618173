"""Lightning checkpoints with a Hugging Face folder beside each one.

Next to `epoch=0-step=300.ckpt` this writes `epoch=0-step=300.hf/`: the LoRA
adapter in PEFT format (`adapter_config.json` + `adapter_model.safetensors`) when
the module trains one, otherwise the full model, plus the processor. Both load
outside this project (`peft.PeftModel.from_pretrained`, `from_pretrained`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def hf_dir(ckpt_path: str | Path) -> Path:
    """The Hugging Face folder that belongs to a Lightning checkpoint file."""
    path = Path(ckpt_path)
    return path.with_name(path.stem + ".hf")


class HFCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the module's `save_pretrained` folder.

    ModelCheckpoint has no public hook that receives the checkpoint's path, so
    this overrides its `_save_checkpoint` / `_remove_checkpoint` (stable across
    Lightning 2.x; tests/callbacks cover both).
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        module = trainer.lightning_module
        if not hasattr(module, "save_pretrained"):
            return
        target = hf_dir(filepath)
        # Written beside, then swapped in: a run killed mid-write leaves the previous
        # folder (or a `.partial` one nothing reads), never a half-written `.hf`.
        partial = target.with_name(target.name + ".partial")
        if trainer.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        trainer.strategy.barrier("hf_checkpoint")
        # Every process calls it: with sharded weights gathering them is a collective
        # (modules/shared.py save_pretrained writes on rank 0 only).
        module.save_pretrained(partial)
        if trainer.is_global_zero:
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                target.rename(old)
            partial.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        trainer.strategy.barrier("hf_checkpoint_done")

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            shutil.rmtree(hf_dir(filepath), ignore_errors=True)
