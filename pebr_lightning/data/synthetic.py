"""Synthetic datasets: data written on demand by an installed package.

A synthetic dataset is registered in the `pebr_lightning.datasets` entry-point group
(pebr_lightning/entry_points.py) as an object with

    splits: dict[str, int]          split -> record count of its standard layout
    write(out_dir, n, seed) -> Path  write `out_dir/manifest.jsonl` (+ images); same
                                     seed, same bytes
    written_differently(manifest, n, seed) -> str | None
                                     why an existing manifest is not what `write`
                                     writes now, or None

`pebr data synth` and a schedule's `synth` block write data this way; the demo's
`shapes` (pebr_demo/data/synth.py) is the default, and the only one shipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from pebr_lightning import entry_points

DEFAULT = "shapes"
"""The dataset `pebr data synth` and a schedule's `synth` block write unless named."""


@runtime_checkable
class SyntheticData(Protocol):
    splits: dict[str, int]

    def write(self, out_dir: str | Path, n: int, seed: int) -> Path: ...

    def written_differently(self, manifest: str | Path, n: int, seed: int) -> str | None: ...


def load_synthetic(name: str = DEFAULT) -> SyntheticData:
    """The synthetic dataset registered as `name`; an error names it if it is not one."""
    data = entry_points.load(entry_points.DATASETS, name, "synthetic dataset")
    if not isinstance(data, SyntheticData):
        raise TypeError(
            f"synthetic dataset {name!r} ({type(data).__name__}) lacks part of the contract: "
            "`splits`, `write(out_dir, n, seed)` and `written_differently(manifest, n, seed)`"
        )
    return data
