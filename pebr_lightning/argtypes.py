"""argparse types shared by the commands beside the LightningCLI (`pebr data`, ...)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type of the extra commands: a whole number >= 1, with a clear message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
