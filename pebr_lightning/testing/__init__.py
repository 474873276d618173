"""Helpers for tests of pebr_lightning and of plugins built on it."""

from pebr_lightning.testing.snapshot import ParameterSnapshot

__all__ = ["ParameterSnapshot"]
