"""Callbacks and rewards that break a run on purpose, for reliability tests."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import lightning as L

from pebr_lightning.callbacks.checkpoint import HFCheckpoint, hf_step


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


class KillBeforeHFSwap(HFCheckpoint):
    """HFCheckpoint that SIGKILLs its process when `last.hf` of step `step` is written
    but not yet swapped in: `last.ckpt` holds step `step`, `last.hf` the step before,
    and `last.hf.partial` is left, as a job pre-empted at that moment leaves them."""

    def __init__(self, step: int, **kwargs) -> None:
        """
        Args:
            step: the step whose `last.hf` swap is cut; 0 never kills.
            kwargs: HFCheckpoint's (save_last, every_n_train_steps, ...).
        """
        super().__init__(**kwargs)
        self.step = step

    def _swap_in(self, partial: Path, target: Path) -> None:
        if self.step and target.name == "last.hf" and hf_step(partial) == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._swap_in(partial, target)


class FillDiskBeforeHF(HFCheckpoint):
    """HFCheckpoint that, before writing the `.hf` folder of step `step`, fills the
    disk under its checkpoint folder up to `room` bytes left (a `filler` file beside
    the checkpoints): the full disk lands in the `.hf` write, after the `.ckpt`."""

    def __init__(self, step: int, room: int = 64 * 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.room = room

    def _save_hf(self, trainer, target: Path) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            stats = os.statvfs(target.parent)
            free = stats.f_bavail * stats.f_frsize
            with open(target.parent / "filler", "wb") as filler:
                for _ in range(max(0, free - self.room) // (1 << 16)):
                    filler.write(b"\0" * (1 << 16))
        super()._save_hf(trainer, target)


class _FaultFromStep:
    """A reward that scores 0.5 until `step`, then does its fault (`fault()`); it
    touches `marker` (when given) first, so a test knows when to act."""

    name = "fault"

    def __init__(self, step: int = 0, marker: str | None = None) -> None:
        self.step = step
        self.marker = marker

    def __call__(self, *, completions, samples, **context):
        if context.get("global_step", 0) >= self.step:
            if self.marker:
                Path(self.marker).touch()
            self.fault()
        return [0.5] * len(completions)

    def fault(self) -> None:
        raise NotImplementedError


class HangingReward(_FaultFromStep):
    """A reward whose call never returns (from step `step` on): the hung-plugin fault."""

    name = "hanging"

    def fault(self) -> None:
        while True:
            time.sleep(3600)


class ExitingReward(_FaultFromStep):
    """A reward that calls `sys.exit(code)` from step `step` on (a library doing so)."""

    name = "exiting"

    def __init__(self, step: int = 0, code: int = 0) -> None:
        super().__init__(step)
        self.code = code

    def fault(self) -> None:
        sys.exit(self.code)


class GILHoggingReward(_FaultFromStep):
    """A reward stuck in one C call that never releases the GIL (catastrophic regex
    backtracking) from step `step` on: neither a Python signal handler nor another
    thread runs until it returns, in hours."""

    name = "gil_hog"

    def fault(self) -> None:
        import re

        re.match(r"(a+)+$", "a" * 64 + "b")


class TouchPayload:
    """Pickles to `os.system("touch MARKER")`: what a crafted checkpoint, adapter or
    shard would run if it were ever unpickled; a test checks that MARKER never appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
