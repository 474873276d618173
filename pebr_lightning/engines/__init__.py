"""Rollout engines: what generates completions for GRPO, `pebr eval` and `pebr sample`."""

from pebr_lightning.engines.base import (
    RolloutConfig,
    RolloutEngine,
    build_engine,
    complete_records,
    load_decoder,
    timed_sync,
)
from pebr_lightning.engines.hf import HFEngine

__all__ = [
    "HFEngine",
    "RolloutConfig",
    "RolloutEngine",
    "build_engine",
    "complete_records",
    "load_decoder",
    "timed_sync",
]
