"""The `pebr` command: extra subcommands, and bad input -> one clear message, exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pebr_lightning.cli import main
from pebr_lightning.data.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_fit_and_extra_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("fit", "validate", "test", "predict", "pebr data"):
        assert word in out


def _break(manifest: Path, case: str) -> tuple[int, str | None]:
    """Damage line 2 of a 3-record manifest; returns (line, field) the error must name."""
    lines = manifest.read_text().splitlines()
    record = json.loads(lines[1])
    image = manifest.parent / record["image"]
    if case == "missing image":
        image.unlink()
        field = "image"
    elif case == "unreadable image":
        image.write_bytes(b"this is not a png")
        field = "image"
    elif case == "truncated image":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
        field = "image"
    elif case == "malformed json":
        lines[1] = lines[1][:-5]
        field = None
    elif case == "missing field":
        del record["question"]
        lines[1] = json.dumps(record)
        field = "question"
    elif case == "mistyped field":
        record["answer"] = 3
        lines[1] = json.dumps(record)
        field = "answer"
    else:
        raise ValueError(case)
    manifest.write_text("\n".join(lines) + "\n")
    return 2, field


CASES = [
    "missing image",
    "unreadable image",
    "truncated image",
    "malformed json",
    "missing field",
    "mistyped field",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_manifest_exits_2_naming_file_line_and_field(case, tmp_path, capsys):
    manifest = write_dataset(tmp_path, n=3, seed=0)
    line, field = _break(manifest, case)
    assert main(["data", "validate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert f"manifest.jsonl:{line}:" in err
    if field is not None:
        assert f"field '{field}'" in err
    assert "Traceback" not in err


def test_empty_manifest_exits_2(tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n")
    assert main(["data", "validate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "manifest.jsonl" in err and "empty" in err


def test_skip_invalid_reports_how_many_and_which(tmp_path, capsys):
    manifest = write_dataset(tmp_path, n=3, seed=0)
    _break(manifest, "missing field")
    assert main(["data", "validate", str(manifest), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "2 valid, 1 skipped" in out
    assert "manifest.jsonl:2: field 'question'" in out


def test_fit_on_bad_manifest_fails_before_loading_the_model(tmp_path):
    """The real console script: message on stderr, exit code 2, no traceback."""
    manifest = write_dataset(tmp_path / "data", n=3, seed=0)
    _break(manifest, "mistyped field")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("pebr")),
            "fit",
            "--config",
            str(REPO / "configs" / "demo" / "sft.yaml"),
            "--data.init_args.train_manifest",
            str(manifest),
            "--data.init_args.val_manifest",
            "null",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: " in result.stderr
    assert "manifest.jsonl:2: field 'answer'" in result.stderr
    assert "Traceback" not in result.stderr


def test_fit_with_skip_invalid_trains_on_the_valid_records(tmp_path, shapes_data):
    manifest = write_dataset(tmp_path / "data", n=10, seed=0)
    _break(manifest, "missing image")
    with pytest.warns(UserWarning, match=r"skipped 1 invalid record\(s\)"):
        code = main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "demo" / "sft.yaml"),
                "--data.init_args.train_manifest",
                str(manifest),
                "--data.init_args.val_manifest",
                "null",
                "--data.init_args.skip_invalid",
                "true",
                "--data.init_args.batch_size",
                "3",
                "--data.init_args.num_workers",
                "0",
                "--trainer.max_steps",
                "3",
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
            ]
        )
    assert code == 0
    assert list((tmp_path / "run").rglob("last.ckpt"))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], ["CSVLogger", "TensorBoardLogger"]),
        (
            [
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir={tmp}",
            ],
            ["CSVLogger"],
        ),
        (["--trainer.logger=false"], []),
    ],
)
def test_default_loggers_are_csv_and_tensorboard_in_one_version(extra, expected, tmp_path):
    """Left at its default, the logger is CSV + TensorBoard sharing the next free
    version_N (version_0 exists, so version_1); a logger the user names is kept."""
    from pebr_lightning.cli import cli

    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    built = cli(
        [
            "--config",
            str(REPO / "configs" / "demo" / "sft.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            *(arg.format(tmp=tmp_path) for arg in extra),
        ],
        run=False,
    )
    loggers = built.trainer.loggers
    assert [type(lg).__name__ for lg in loggers] == expected
    if len(loggers) == 2:
        assert {Path(lg.log_dir) for lg in loggers} == {tmp_path / "lightning_logs" / "version_1"}
