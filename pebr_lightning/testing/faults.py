"""Callbacks that break a run on purpose, for reliability tests."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs its own process when a training batch starts at `step` optimizer steps.

    Checkpoint callbacks run after the others at a batch's end, so the checkpoint of
    step `step` is on disk and the next step is cut short, as a pre-empted job is.
    """

    def __init__(self, step: int) -> None:
        """
        Args:
            step: optimizer steps done when the process kills itself.
        """
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
