"""Lightning checkpoints with a Hugging Face folder beside each one.

Next to `epoch=0-step=300.ckpt` this writes `epoch=0-step=300.hf/`: the LoRA
adapter in PEFT format (`adapter_config.json` + `adapter_model.safetensors`) when
the module trains one, otherwise the full model, plus the processor. Both load
outside this project (`peft.PeftModel.from_pretrained`, `from_pretrained`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from pebr_lightning.files import no_room_error


def hf_dir(ckpt_path: str | Path) -> Path:
    """The Hugging Face folder that belongs to a Lightning checkpoint file."""
    path = Path(ckpt_path)
    return path.with_name(path.stem + ".hf")


MARKER = "pebr_checkpoint.json"
"""Written into every `.hf` folder: the training step of the weights it holds."""


def hf_step(folder: str | Path) -> int | None:
    """The step recorded in an `.hf` folder; None when it has no (readable) record."""
    try:
        return int(json.loads((Path(folder) / MARKER).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_step(ckpt: str | Path) -> int | None:
    """The global step a Lightning checkpoint (file, or sharded folder's meta.pt) holds."""
    import torch

    path = Path(ckpt)
    meta = path / "meta.pt" if path.is_dir() else path
    try:
        data = torch.load(meta, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: no step to compare with
        return None
    step = data.get("global_step") if isinstance(data, dict) else None
    return step if isinstance(step, int) else None


class HFCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the module's `save_pretrained` folder.

    ModelCheckpoint has no public hook that receives the checkpoint's path, so
    this overrides its `_save_checkpoint` / `_remove_checkpoint` (stable across
    Lightning 2.x; tests/callbacks cover both). Each `.hf` folder records the step of
    its weights (MARKER); at the end of a fit, a `last.hf` that does not hold the
    final step's weights (a run killed between writing `last.ckpt` and its `.hf`,
    then resumed at max_steps) is written again.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._save_hf(trainer, hf_dir(filepath))

    def _save_hf(self, trainer: L.Trainer, target: Path) -> None:
        module = trainer.lightning_module
        if not hasattr(module, "save_pretrained"):
            return
        # Written beside, then swapped in: a run killed mid-write leaves the previous
        # folder (or a `.partial` one nothing reads), never a half-written `.hf`.
        partial = target.with_name(target.name + ".partial")
        if trainer.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        trainer.strategy.barrier("hf_checkpoint")
        # Every process calls it: with sharded weights gathering them is a collective
        # (modules/shared.py save_pretrained writes on rank 0 only).
        try:
            module.save_pretrained(partial)
        except BaseException as err:
            # nothing half-written stays behind, and a full disk is said as such
            if trainer.is_global_zero:
                shutil.rmtree(partial, ignore_errors=True)
            full = no_room_error(err, partial)
            if full is not None and full is not err:
                raise full from err
            raise
        if trainer.is_global_zero:
            (partial / MARKER).write_text(json.dumps({"global_step": trainer.global_step}) + "\n")
            self._swap_in(partial, target)
        trainer.strategy.barrier("hf_checkpoint_done")

    def _swap_in(self, partial: Path, target: Path) -> None:
        """Replace `target` by the complete `partial` folder (rank 0)."""
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        partial.rename(target)
        shutil.rmtree(old, ignore_errors=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """When the last checkpoint holds the step the fit ended at, make its `.hf` hold it too.

        The last checkpoint is the one this run saved, or, when a resumed run had no
        step left to take, the one it resumed from. (One saved before the final step,
        when the save interval does not divide max_steps, keeps its own `.hf`.)
        Then it prints both paths: the `.hf` folder is what `--model.init_args.policy.model`,
        `pebr eval --model` and `pebr sample --model` take.
        """
        last = self.last_model_path
        if not last and trainer.ckpt_path and Path(trainer.ckpt_path).name == "last.ckpt":
            last = trainer.ckpt_path
        if not self.save_last or not last or not Path(last).exists():
            return
        target = hf_dir(last)
        stale = False
        if trainer.is_global_zero:
            found = hf_step(target)
            stale = found != trainer.global_step and checkpoint_step(last) == trainer.global_step
        stale = trainer.strategy.broadcast(stale)
        if stale:
            if trainer.is_global_zero:
                print(
                    f"{target}: held step {found}, not the final step {trainer.global_step}; "
                    "writing it again",
                    file=sys.stderr,
                )
            self._save_hf(trainer, target)
        if trainer.is_global_zero and target.is_dir():
            # Where the run's weights are is the first thing the next command needs.
            print(f"checkpoint: {last}\nweights:    {target}", flush=True)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            shutil.rmtree(hf_dir(filepath), ignore_errors=True)
