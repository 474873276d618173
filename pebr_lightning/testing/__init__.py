"""Checks for tests of reward plugins: the contract `pebr rewards check` runs.

    from pebr_lightning.testing import check_reward, make_context, make_samples

The checks live in rewards/checks.py; this module is their stable import path for
plugin authors. Helpers for this repository's own tests (fault injectors, process
runners) live in the demo package, `pebr_demo.testing`.
"""

from pebr_lightning.rewards.checks import (
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

__all__ = [
    "RewardCheckReport",
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
