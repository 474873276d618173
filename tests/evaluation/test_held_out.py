"""Greedy accuracy in Lightning's loops: GRPO validation during fit, `pebr validate`
and `pebr test`, graded as `pebr eval` grades (the SFT side, with a trained model,
is in tests/modules/test_sft_learns.py)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest

from pebr_lightning.cli import main
from pebr_lightning.evaluation.greedy import evaluate

REPO = Path(__file__).resolve().parents[2]


def logged(run: Path) -> list[dict[str, str]]:
    (metrics,) = run.rglob("metrics.csv")
    with metrics.open() as file:
        return list(csv.DictReader(file))


def grpo_args(tiny_path: Path, shapes_data: dict, root: Path) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "demo" / "reasoning.yaml"),
        "--model.init_args.policy.model",
        str(tiny_path),
        "--model.init_args.sampling.group_size",
        "2",
        "--model.init_args.sampling.max_new_tokens",
        "8",
        "--data.init_args.train_manifest",
        str(shapes_data["train"]),
        "--data.init_args.val_manifest",
        str(shapes_data["val"]),
        "--data.init_args.test_manifest",
        str(shapes_data["val"]),
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.eval_batch_size",
        "5",
        "--trainer.default_root_dir",
        str(root),
    ]


def test_grpo_validates_and_tests_with_greedy_accuracy(tiny_path, shapes_data, tmp_path):
    expected = evaluate(
        str(tiny_path), shapes_data["val"], tmp_path / "eval", max_new_tokens=8, progress=False
    )
    args = grpo_args(tiny_path, shapes_data, tmp_path / "fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["fit", *args, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    assert code == 0
    assert not [w for w in caught if "validation_step" in str(w.message)]
    rows = [r for r in logged(tmp_path / "fit") if r.get("val/accuracy")]
    assert len(rows) == 1 and rows[0]["step"] == "1"  # after the 2nd step (0-based)
    assert float(rows[0]["val/n"]) == 16

    for command, prefix in (("validate", "val"), ("test", "test")):
        root = tmp_path / command
        assert main([command, *grpo_args(tiny_path, shapes_data, root)]) == 0
        (row,) = [r for r in logged(root) if r.get(f"{prefix}/accuracy")]
        assert float(row[f"{prefix}/n"]) == expected["n"] == 16
        assert float(row[f"{prefix}/accuracy"]) == pytest.approx(expected["accuracy"])
        types = {k for k in row if k.startswith(f"{prefix}/accuracy/") and row[k]}
        # per question type; the description decomposition is pebr eval's alone
        per_type = [k for k in expected if k.startswith("accuracy/") and "desc_" not in k]
        assert types == {f"{prefix}/{k}" for k in per_type}
