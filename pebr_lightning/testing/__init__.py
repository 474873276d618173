"""Helpers for tests of pebr_lightning and of plugins built on it."""

from pebr_lightning.testing.faults import (
    ExitingReward,
    FillDiskBeforeHF,
    GILHoggingReward,
    HangingReward,
    KillAtStep,
    KillBeforeHFSwap,
    TouchPayload,
)
from pebr_lightning.testing.rewards import (
    RewardCheckReport,
    check_context_keys,
    check_deterministic,
    check_lengths,
    check_no_mutation,
    check_pickle,
    check_reward,
    check_values,
    make_batch,
    make_context,
    make_samples,
    run_checks,
)
from pebr_lightning.testing.snapshot import ParameterSnapshot

__all__ = [
    "ExitingReward",
    "FillDiskBeforeHF",
    "GILHoggingReward",
    "HangingReward",
    "KillAtStep",
    "KillBeforeHFSwap",
    "ParameterSnapshot",
    "RewardCheckReport",
    "TouchPayload",
    "check_context_keys",
    "check_deterministic",
    "check_lengths",
    "check_no_mutation",
    "check_pickle",
    "check_reward",
    "check_values",
    "make_batch",
    "make_context",
    "make_samples",
    "run_checks",
]
