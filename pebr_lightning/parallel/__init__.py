"""Training across processes: the FSDP2 strategy and sharding of Qwen-VL policies."""

from pebr_lightning.parallel.strategy import FSDP2Strategy

__all__ = ["FSDP2Strategy"]
