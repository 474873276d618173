"""benchmarks/grpo_vs_trl.py in a tiny mode: both sides run, alternate, and do equal work."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Groups of 4: with 2 completions of 4 random tokens, both sometimes score the same
# vowel share (seen once in CI), and that step is skipped.
ARGS = ["--steps", "3", "--prompts", "1", "--group-size", "4", "--max-new-tokens", "4"]


def test_benchmark_tiny_mode_alternates_equal_work_and_prints_the_table(tmp_path) -> None:
    from pebr_demo.models.tiny import ensure_tiny_model

    ensure_tiny_model()  # shared with the other tests through PEBR_CACHE
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/grpo_vs_trl.py", *ARGS, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert text.startswith(f"command: python benchmarks/grpo_vs_trl.py {' '.join(ARGS)}")
    assert re.search(r"^versions: trl 1\.16\.0, transformers ", text, re.MULTILINE)
    for label in ("TRL GRPOTrainer", "pebr GRPOModule"):
        assert re.search(
            rf"^\| {label} \| [\d.]+ \| \d+ \| [\d.]+ \| [\d.]+-[\d.]+ \| 16 \|$", text, re.M
        )
    assert re.search(r"^ratio \(pebr / TRL samples/s\): [\d.]+x; target >= 1.5x: ", text, re.M)
    for phase in ("rollout", "score", "backward", "optimizer"):
        assert re.search(rf"^\| {phase} \| [\d.]+ \| \d+% \|$", text, re.M), phase

    figures = json.loads(out.read_text())
    trl, ours = figures["steps"]["trl"], figures["steps"]["ours"]
    assert len(trl) == len(ours) == 3
    # equal work, counted by each side from its own output: 1 x 4 completions x 4 tokens
    assert figures["equal_work"] is True
    assert [s["tokens"] for s in trl] == [s["tokens"] for s in ours] == [16, 16, 16]
    assert figures["sides"]["ours"]["skipped_steps"] == 0  # every step ran its update
    # strictly alternating, TRL first: each step ends before the other side's next begins
    spans = [
        span for pair in zip(trl, ours, strict=True) for span in (pair[0]["span"], pair[1]["span"])
    ]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    sides = figures["sides"]
    ratio = sides["ours"]["samples_per_s"] / sides["trl"]["samples_per_s"]
    assert figures["ratio"] == ratio
    assert sides["trl"]["samples_per_s"] == 4 / sides["trl"]["step_s_median"]  # 1 x 4 a step
    assert all(ours[-1]["phases"][p] > 0 for p in ("rollout", "backward", "optimizer"))
