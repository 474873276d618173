"""Lightning's tqdm progress bar with the figures a GRPO or SFT user watches.

TRL prints reward, KL and clip ratio at every logging step; Lightning's bar shows
only what a module logs with `prog_bar=True`. This bar adds short names for the
logged figures that tell whether a run is learning (`metrics`), whatever module
logged them, so the modules' logging stays one `self.log` per figure.

Without a terminal (a log file, CI, a scheduler's batch job) a bar is a stream of
carriage returns; there the bar turns itself off and `MetricsPrinter` prints plain
lines instead (it prints only when no terminal is attached, by default).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

SHOWN = {
    "loss": "train/loss",
    "reward": "reward/total/mean",
    "acc": "reward/accuracy/mean",
    "kl": "train/kl",
    "clip": "train/clip_frac",
    "val_acc": "val/accuracy",
}
"""Short name on the bar -> logged metric; a metric a run does not log is left out.
`train/clip_frac` is the sum of the low, high and dual clip fractions (the share of
completion tokens whose ratio was clipped)."""

CLIP_PARTS = ("train/clip_frac/low", "train/clip_frac/high", "train/clip_frac/dual")


def terminal_attached() -> bool:
    """Whether stdout (where Lightning's bar draws) is an interactive terminal."""
    stream = sys.stdout
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class ProgressBar(TQDMProgressBar):
    def __init__(
        self,
        refresh_rate: int = 1,
        process_position: int = 0,
        leave: bool = False,
        metrics: dict[str, str] | None = None,
        without_terminal: bool = False,
    ) -> None:
        """
        Args:
            refresh_rate: redraw every this many batches.
            process_position: line offset, for several bars at once.
            leave: keep the finished bar of each epoch on screen.
            metrics: short name -> logged metric shown on the bar (default: loss, reward,
                accuracy, KL, clip fraction and validation accuracy, as logged).
            without_terminal: draw even when stdout is not a terminal.
        """
        super().__init__(refresh_rate, process_position, leave)
        self.metrics = dict(SHOWN if metrics is None else metrics)
        self.without_terminal = without_terminal

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not (self.without_terminal or terminal_attached()):
            self.disable()
        super().setup(trainer, pl_module, stage)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if any(part in logged for part in CLIP_PARTS):
            logged["train/clip_frac"] = sum(logged.get(part, 0.0) for part in CLIP_PARTS)
        for short, name in self.metrics.items():
            if name in logged:
                items.pop(name, None)  # also logged with prog_bar=True: shown once
                items[short] = f"{logged[name]:.3g}"
        return items
