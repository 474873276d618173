"""Training across processes: the FSDP2 strategy and sharding of VLM policies."""

from pebr_lightning.parallel.strategy import FSDP2Strategy

__all__ = ["FSDP2Strategy"]
