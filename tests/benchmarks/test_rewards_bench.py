"""benchmarks/rewards.py runs in quick mode and prints its full table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_rewards_benchmark_quick_prints_every_row() -> None:
    from pebr_demo.models.tiny_clip import ensure_tiny_clip

    ensure_tiny_clip()  # shared with the other tests through PEBR_CACHE
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "rewards.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("command: python benchmarks/rewards.py --quick\n")
    assert re.search(r"^date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", out, re.MULTILINE)
    assert re.search(r"^machine: \d+ CPUs .*torch \S+ threads=\d+", out, re.MULTILINE)
    assert "8 images x G=8 = 64 descriptions" in out
    rows = [line for line in out.splitlines() if re.match(r"\| (1 \(one by one\)|\d+) \|", line)]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [(c[0], c[1], c[2]) for c in cells] == [
        ("1 (one by one)", "yes", "8"),
        ("1 (one by one)", "no", "64"),
        ("32", "yes", "8"),
        ("32", "no", "64"),
        ("64", "yes", "8"),
        ("64", "no", "64"),
    ]
    for c in cells:
        assert float(c[3]) > 0 and float(c[4]) > 0  # seconds per call, descriptions/s
    assert cells[1][5] == "1.0x"  # one by one without de-dup is the baseline
