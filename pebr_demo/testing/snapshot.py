"""Record a module's parameters before and after training, to prove what changed."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class ParameterSnapshot(L.Callback):
    """Saves `{"before", "after": {name: tensor}, "trainable": [names]}` to `path`.

    Add it to any run (`--trainer.callbacks+=pebr_demo.testing.ParameterSnapshot
    --trainer.callbacks.path=snap.pt`) and compare the two states in a test.
    """

    def __init__(self, path: str) -> None:
        """
        Args:
            path: file the snapshot is written to when training ends.
        """
        self.path = Path(path)
        self.before: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = _copy(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"before": self.before, "after": _copy(pl_module), "trainable": trainable}, self.path
        )


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters()}
