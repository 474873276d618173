"""Weights that already hold NaN are refused on load: resume, export, eval.

Before, each went ahead with exit 0: a resumed fit skipped every step as non-finite,
`pebr eval` scored 0, `pebr export` wrote a model full of NaN.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pebr_lightning.cli import main
from pebr_lightning.models.finite import nonfinite_names

from .test_checkpoints import sft_args as checkpoint_args

POISONED = "policy.model.language_model.layers.0.mlp.up_proj.weight"


def sft_args(train: Path, root: Path, steps: int) -> list[str]:
    """The demo SFT config as test_checkpoints runs it, with the config's own single
    checkpoint callback (one last.ckpt, one last.hf)."""
    return checkpoint_args(train, root, steps)[:-3]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes_data, tiny_path) -> dict[str, Path]:
    """A 1-step SFT run's last.ckpt and last.hf, and copies of both with one NaN."""
    root = tmp_path_factory.mktemp("nan-run")
    assert main(sft_args(shapes_data["train"], root / "run", 1)) == 0
    (ckpt,) = root.rglob("last.ckpt")
    (weights,) = root.rglob("last.hf")
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    data["state_dict"][POISONED][0, 0] = float("nan")
    poisoned_ckpt = root / "poisoned.ckpt"
    torch.save(data, poisoned_ckpt)
    poisoned_hf = root / "poisoned.hf"
    shutil.copytree(weights, poisoned_hf)
    tensors = load_file(poisoned_hf / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"  # the saved layout (transformers converts it)
    tensors[name][1, 1] = float("inf")
    save_file(tensors, poisoned_hf / "model.safetensors", metadata={"format": "pt"})
    return {"ckpt": poisoned_ckpt, "hf": poisoned_hf, "clean_hf": weights, "root": root}


def test_nonfinite_names_by_hand() -> None:
    named = [
        ("ok", torch.zeros(2)),
        ("nan", torch.tensor([0.0, float("nan")])),
        ("ints", torch.tensor([1, 2])),
        ("inf", torch.tensor([float("-inf")], dtype=torch.bfloat16)),
    ]
    assert nonfinite_names(named) == ["nan", "inf"]


def test_resume_refuses_a_checkpoint_holding_nan(run, shapes_data, tmp_path, capsys) -> None:
    args = sft_args(shapes_data["train"], tmp_path, 3)
    assert main([*args, "--ckpt_path", str(run["ckpt"])]) == 2
    err = capsys.readouterr().err
    assert f"{run['ckpt']}: 1 weight tensor(s) hold NaN or inf ({POISONED})" in err
    assert "use an earlier checkpoint" in err
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained on from it


def test_export_refuses_a_checkpoint_holding_nan(run, tmp_path, capsys) -> None:
    out = tmp_path / "export"
    assert main(["export", str(run["ckpt"]), "--out", str(out)]) == 2
    assert "hold NaN or inf" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".export*"))


def test_eval_refuses_weights_holding_inf(run, shapes_data, tmp_path, capsys) -> None:
    argv = ["eval", "--manifest", str(shapes_data["val"]), "--limit", "2"]
    assert main([*argv, "--model", str(run["hf"]), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"model {run['hf']}: 1 weight tensor(s) hold NaN or inf" in err
    assert not (tmp_path / "bad" / "metrics.json").exists()
    # the same run's untouched weights evaluate
    assert main([*argv, "--model", str(run["clean_hf"]), "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "metrics.json").exists()
