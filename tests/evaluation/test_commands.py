"""`pebr eval` on the tiny model: where it runs, said on stdout and kept in metrics.json."""

from __future__ import annotations

import json

import pytest
import torch

from pebr_lightning.cli import main as pebr_main


def expected_placement() -> tuple[str, str]:
    if not torch.cuda.is_available():
        return "cpu", "float32"
    return "cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float32"


def test_eval_runs_where_auto_says_and_records_it(tiny_path, shapes_data, tmp_path, capsys):
    """No --device, no --dtype: cpu in float32 on a machine without CUDA."""
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tiny_path), "--manifest", str(shapes_data["val"])]
    argv += ["--out", str(out), "--limit", "2", "--max-new-tokens", "4", "--no-progress"]
    assert pebr_main(argv) == 0
    device, dtype = expected_placement()
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"running on {device} in {dtype}"
    assert captured.err == ""  # --no-progress: no bar
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["device"].split(":")[0] == device and saved["dtype"] == dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_eval_on_cuda_without_cuda_exits_2_with_one_line(tiny_path, shapes_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tiny_path), "--manifest", str(shapes_data["val"])]
    assert pebr_main([*argv, "--out", str(out), "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device: cuda needs a CUDA device and none is available here")
    assert err.count("\n") == 1 and not out.exists()
