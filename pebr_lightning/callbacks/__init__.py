from pebr_lightning.callbacks.checkpoint import HFCheckpoint
from pebr_lightning.callbacks.printer import MetricsPrinter
from pebr_lightning.callbacks.progress import ProgressBar

__all__ = ["HFCheckpoint", "MetricsPrinter", "ProgressBar"]
