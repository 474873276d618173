"""Export: a training checkpoint of any stage -> PEFT adapter + merged Hugging Face model."""

from pebr_lightning.export.export import ExportResult, export_checkpoint, read_checkpoint

__all__ = ["ExportResult", "export_checkpoint", "read_checkpoint"]
