"""Rollout engines: what generates completions for GRPO, `pebr eval` and `pebr sample`."""

from pebr_lightning.engines.base import (
    EngineContext,
    EngineSettings,
    RolloutConfig,
    RolloutEngine,
    build_engine,
    complete_records,
    load_decoder,
    registered_engines,
    timed_sync,
)
from pebr_lightning.engines.hf import HFConfig, HFEngine

__all__ = [
    "EngineContext",
    "EngineSettings",
    "HFConfig",
    "HFEngine",
    "RolloutConfig",
    "RolloutEngine",
    "build_engine",
    "complete_records",
    "load_decoder",
    "registered_engines",
    "timed_sync",
]
