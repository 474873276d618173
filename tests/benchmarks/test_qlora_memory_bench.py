"""benchmarks/qlora_memory.py: a real subprocess run of the small config on CPU, its
table against its JSON, the 7B-on-CPU refusal, and the warm-up/median summary."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "qlora_memory.py"
PHASES = ["rollout", "score", "logprobs", "backward", "optimizer"]


def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_small_cpu_run_prints_every_phase_and_writes_the_same_json(tiny_path, tmp_path):
    out = tmp_path / "figures.json"
    args = ["--size", "small", "--device", "cpu", "--steps", "1", "--group-size", "2"]
    args += ["--max-new-tokens", "4", "--out", str(out), "--workdir", str(tmp_path)]
    result = run_script(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert text.startswith(f"command: python benchmarks/qlora_memory.py {shlex.join(args)}\n")
    assert re.search(r"^date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", text, re.MULTILINE)
    assert re.search(r"^machine: \d+ CPUs .*no GPU used$", text, re.MULTILINE)
    assert re.search(r"^versions: torch \S+, transformers \S+, bitsandbytes \S+$", text, re.M)
    assert re.search(r"^model: [\d.]+ B parameters", text, re.MULTILINE)
    rows = [line for line in text.splitlines() if re.match(r"\| [a-z]+ \| [\d.-]+ \|", line)]
    cells = {c[0]: c[1:] for c in ([x.strip() for x in r.strip("|").split("|")] for r in rows)}
    assert list(cells) == PHASES

    report = json.loads(out.read_text())
    assert report["settings"]["group_size"] == 2 and report["settings"]["max_new_tokens"] == 4
    assert list(report["phases"]) == PHASES
    assert len(report["steps"]) == 1 and report["measured_steps"] == 1
    for name, (peak, seconds) in cells.items():
        figures = report["phases"][name]
        assert float(seconds) > 0
        assert float(seconds) == pytest.approx(figures["seconds"], rel=1e-3)
        # CPU peak: the process's RSS, well above zero (a Python process with torch)
        assert float(peak) > 0.1
        assert float(peak) == pytest.approx(figures["peak_gib"], abs=1e-3)
    overall = report["overall"]
    assert f"overall: peak {overall['peak_gib']:.3f} GiB (in {overall['peak_phase']})" in text
    assert "target: peak <= 20 GiB: met here, but the target is about --size 7b" in text
    assert report["meets_target"] is True  # a small model on CPU stays far below 20 GiB


def test_7b_on_cpu_is_refused_without_force():
    result = run_script("--size", "7b", "--device", "cpu", timeout=60)
    assert result.returncode == 2
    assert "--size 7b --device cpu is not a goal" in result.stderr
    assert result.stdout == ""


def test_summary_leaves_out_the_warm_up_step_and_takes_max_peak_median_seconds():
    """Steps 1-3; step 1 is warm-up. rollout: peaks 2 and 3 GiB -> 3; seconds 4 and 6
    -> median 5. score is missing in step 3 (0 s there): median of 1 and 0 = 0.5."""
    spec = importlib.util.spec_from_file_location("qlora_memory", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gib = 2**30

    def step(seconds, rollout, score=None):
        phases = {"rollout": {"seconds": rollout[0], "peak_bytes": rollout[1] * gib}}
        if score is not None:
            phases["score"] = {"seconds": score, "peak_bytes": None}
        return {"seconds": seconds, "phases": phases}

    steps = [step(99.0, (90.0, 9.0), 9.0), step(5.0, (4.0, 2.0), 1.0), step(7.0, (6.0, 3.0))]
    figures = bench.summarize(steps)
    assert figures["measured_steps"] == 2
    assert figures["phases"]["rollout"] == {"peak_gib": 3.0, "seconds": 5.0}
    assert figures["phases"]["score"] == {"peak_gib": None, "seconds": 0.5}
    assert figures["overall"] == {
        "peak_gib": 3.0,
        "peak_phase": "rollout",
        "step_seconds": 6.0,
        "phase_seconds": 5.5,
    }
    assert bench.table(figures)[2:] == ["| rollout | 3.000 | 5 |", "| score | - | 0.5 |"]
