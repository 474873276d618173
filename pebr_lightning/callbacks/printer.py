"""Plain-text progress: one line every N steps and a first-vs-last summary.

A progress bar is unreadable in logs and CI; these lines are what a user compares
between runs (and what the README's demo shows). They are printed when no progress
bar is drawn (no terminal attached, or the bar turned off), so a terminal shows the
bar and a log file shows the lines; `always: true` prints them beside the bar too.
"""

from __future__ import annotations

import math
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class MetricsPrinter(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 25,
        metric: str = "train/loss",
        window: float = 0.1,
        always: bool = False,
    ):
        """
        Args:
            every_n_steps: print a line every this many optimizer steps.
            metric: the logged training metric to print and summarise.
            window: share of the run averaged for the "start" and "end" figures.
            always: print even while a progress bar is drawn.
        """
        self.every_n_steps = every_n_steps
        self.metric = metric
        self.window = window
        self.always = always
        self.quiet = False
        self.values: list[float] = []
        self.start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.values = []
        self.start = time.perf_counter()
        bar = trainer.progress_bar_callback
        self.quiet = not self.always and bar is not None and bar.is_enabled

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            return
        self.values.append(float(value))
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.max_steps:
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
            elapsed = time.perf_counter() - self.start
            value = self.values[-1]
            self._print(
                f"step {step:>5} | {self.metric} {value:.4f} | lr {lr:.2e} | {elapsed:6.1f}s"
            )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if shown:
            parts = " | ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
            self._print(f"step {trainer.global_step:>5} | {parts}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        first, last = self.summary()
        if first is not None:
            self._print(
                f"{self.metric}: first {self.window:.0%} of steps {first:.4f} -> "
                f"last {self.window:.0%} {last:.4f} ({len(self.values)} steps, "
                f"{time.perf_counter() - self.start:.1f}s)",
                force=True,  # one closing line: useful under a bar too
            )

    def summary(self) -> tuple[float | None, float | None]:
        """Mean of the metric over the first and the last `window` of the steps seen."""
        if not self.values:
            return None, None
        n = max(1, int(len(self.values) * self.window))
        return sum(self.values[:n]) / n, sum(self.values[-n:]) / n

    @rank_zero_only
    def _print(self, line: str, force: bool = False) -> None:
        if force or not self.quiet:
            print(line, flush=True)
