"""Helpers for this repository's tests: fault injectors (a reward that hangs, a
callback killed at a step, a disk that fills), process runners and parameter
snapshots. The reward-plugin checks are core: `pebr_lightning.testing`."""

from pebr_demo.testing.faults import (
    ExitingReward,
    FillDiskBeforeHF,
    GILHoggingReward,
    HangingReward,
    KillAtStep,
    KillBeforeHFSwap,
    TouchPayload,
)
from pebr_demo.testing.snapshot import ParameterSnapshot

__all__ = [
    "ExitingReward",
    "FillDiskBeforeHF",
    "GILHoggingReward",
    "HangingReward",
    "KillAtStep",
    "KillBeforeHFSwap",
    "ParameterSnapshot",
    "TouchPayload",
]
