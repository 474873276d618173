"""Shared helpers for the data tests: a tiny synthetic dataset and a manifest writer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pebr_demo.data.synth import write_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Four synthetic records written to `tmp_path`: (manifest path, records as in the file)."""
    manifest = write_dataset(tmp_path, n=4, seed=0)
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    return manifest, records


@pytest.fixture
def write_lines() -> Callable[[Path, list[dict | str]], Path]:
    """A manifest writer: dicts become JSON lines, strings are written verbatim (bad lines)."""

    def write(path: Path, lines: list[dict | str]) -> Path:
        text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
        path.write_text(text, encoding="utf-8")
        return path

    return write
