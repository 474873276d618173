"""`pebr sample` on the tiny model: splits written, a killed run resumed, settings guarded,
where it runs said and kept, a progress bar on stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pebr_lightning.cli import main
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.difficulty.sampler import SampleSettings, sample_difficulty
from pebr_lightning.errors import PebrError


def settings(tiny_path, shapes_data, **changes) -> SampleSettings:
    values = dict(
        model=str(tiny_path),
        manifest=str(shapes_data["train"]),
        k=2,
        max_new_tokens=6,
        limit=6,
    )
    return SampleSettings(**{**values, **changes})


def split_ids(out) -> dict[str, list[str]]:
    return {
        name: [json.loads(line)["id"] for line in (out / f"{name}.jsonl").read_text().splitlines()]
        for name in ("easy", "medium", "hard")
    }


def test_killed_run_resumes_without_redoing_or_duplicating(tiny_path, shapes_data, tmp_path):
    """A run is cut after its second progress line, half-way through writing the third
    (what kill -9 during a write leaves). The resumed run drops the half line, keeps the
    finished lines as they are (the first is edited to 2/2 correct to tell) and grades
    the rest: every question once, in the split its line says."""
    out = tmp_path / "sample"
    first = sample_difficulty(settings(tiny_path, shapes_data), out, batch_size=2, progress=False)
    assert first["questions"] == 6 and sum(first["counts"].values()) == 6
    log = out / "rollouts.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 6
    marked = {**json.loads(lines[0]), "correct": 2}
    log.write_text(json.dumps(marked) + "\n" + lines[1] + "\n" + lines[2][:10])

    again = sample_difficulty(settings(tiny_path, shapes_data), out, batch_size=2, progress=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(r["id"] for r in load_manifest(shapes_data["train"]).records[:6])
    assert rows[0] == marked and len(set(ids)) == 6
    assert again["questions"] == 6 and sum(again["histogram"]) == 6
    assert marked["id"] in split_ids(out)["easy"]  # 2 of k = 2 correct
    for row in rows:
        label = "easy" if row["correct"] == 2 else "hard" if row["correct"] == 0 else "medium"
        assert row["id"] in split_ids(out)[label]
    # The split manifests are manifests: they load, with the original fields.
    easy = load_manifest(out / "easy.jsonl").records
    assert easy[0]["question"] and easy[0]["answer"]


def test_other_settings_do_not_continue_a_run(tiny_path, shapes_data, tmp_path):
    out = tmp_path / "sample"
    sample_difficulty(settings(tiny_path, shapes_data, limit=2), out, progress=False)
    with pytest.raises(PebrError, match=r"other settings \(k: 2 -> 3\)"):
        sample_difficulty(settings(tiny_path, shapes_data, limit=2, k=3), out, progress=False)


def command(tiny_path, shapes_data, out) -> list[str]:
    return [
        "sample",
        "--model",
        str(tiny_path),
        "--manifest",
        str(shapes_data["train"]),
        "--out",
        str(out),
        "--k",
        "2",
        "--max-new-tokens",
        "4",
        "--limit",
        "3",
    ]


def test_command_prints_the_summary(tiny_path, shapes_data, tmp_path, capsys):
    """Without --device: cpu in float32 on a machine without CUDA, said first and kept
    in summary.json; --no-progress leaves stderr empty."""
    code = main([*command(tiny_path, shapes_data, tmp_path / "s"), "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    device, dtype = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = "float32"
    first, rest = captured.out.split("\n", 1)
    assert first == f"running on {device} in {dtype}"
    assert (summary["device"], summary["dtype"]) == (device, dtype)
    assert rest.startswith("3 questions, k = 2")
    assert f"hard   {summary['counts']['hard']:>6}" in rest
    assert captured.err == ""


def test_command_shows_a_progress_bar_on_stderr(tiny_path, shapes_data, tmp_path):
    """A real `pebr sample` process, one question per batch: its stderr holds a bar that
    ends at 3/3 questions, with a rate."""
    pebr = str(Path(sys.executable).with_name("pebr"))
    argv = [*command(tiny_path, shapes_data, tmp_path / "s"), "--batch-size", "1"]
    done = subprocess.run(
        [pebr, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"sample x2: 100%\|[^\r\n]*\| 3/3 \[[^\]]*(q/s|s/q)\]", done.stderr), (
        done.stderr
    )
    assert done.stdout.splitlines()[1] == "3 questions, k = 2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_command_on_cuda_without_cuda_exits_2_with_one_line(
    tiny_path, shapes_data, tmp_path, capsys
):
    out = tmp_path / "s"
    assert main([*command(tiny_path, shapes_data, out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device: cuda needs a CUDA device and none is available here")
    assert err.count("\n") == 1 and not out.exists()
