"""benchmarks/vision_features.py: the separation figures by hand, and the probe on the
embedded model (one token per picture, the shape's own cell)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pebr_demo.data.synth import COLOURS, SHAPE_KINDS

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import vision_features  # noqa: E402


def test_separation_by_hand() -> None:
    # colour on axis 0 (index 0..3), kind on axis 1 (index 0..2, times 2): a colour
    # pair differs by |i - j| on axis 0, a kind pair by 2 |i - j| on axis 1
    features = {
        (k, c): torch.tensor([float(ci), 2.0 * ki])
        for ki, k in enumerate(SHAPE_KINDS)
        for ci, c in enumerate(COLOURS)
    }
    s = vision_features.separation(features)
    # colour pairs of 4: |i-j| = 1,2,3,1,2,1 -> mean 10/6; kind pairs of 3: 2,4,2 -> 8/3
    assert s["colour"] == pytest.approx(10 / 6)
    assert s["kind"] == pytest.approx(8 / 3)
    norms = [((ci**2 + (2 * ki) ** 2) ** 0.5) for ki in range(3) for ci in range(4)]
    assert s["norm"] == pytest.approx(sum(norms) / 12)


def test_the_probe_reads_the_shapes_cell(tiny_path, capsys) -> None:
    features = vision_features.cell_features(tiny_path)
    assert set(features) == {(k, c) for k in SHAPE_KINDS for c in COLOURS}
    # a random tower still tells every picture apart at the shape's own token
    values = list(features.values())
    assert all(v.shape == values[0].shape for v in values)
    assert min(float((a - b).norm()) for i, a in enumerate(values) for b in values[i + 1 :]) > 0
    assert vision_features.main([str(tiny_path)]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {tiny_path} | ") and row.count("|") == 6
