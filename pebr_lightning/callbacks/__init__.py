from pebr_lightning.callbacks.checkpoint import HFCheckpoint
from pebr_lightning.callbacks.printer import MetricsPrinter

__all__ = ["HFCheckpoint", "MetricsPrinter"]
