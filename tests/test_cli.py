"""The `pebr` command: extra subcommands, and bad input -> one clear message, exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pebr_demo.data.synth import write_dataset
from pebr_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_command_one_line_each(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for name in ("fit", "validate", "test", "data", "rewards", "sample", "eval", "schedule"):
        assert name in lines, out
        assert len(lines[name].split()) > 3, f"{name} has no summary: {lines[name]!r}"
    assert "export" in lines
    assert "predict" not in lines  # taken out: `pebr eval` writes completions
    assert main([]) == 2  # no command: the same list, but an error status
    assert "Other commands:" in capsys.readouterr().out


def test_version_and_typo_suggestion(capsys):
    from pebr_lightning import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pebr {__version__}"
    assert main(["evl", "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'evl'; did you mean `pebr eval`?" in err
    assert main(["predict", "--config", "x.yaml"]) == 2
    assert "unknown command 'predict'" in capsys.readouterr().err


def test_model_help_accepts_the_short_class_name(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model.help", "SFTModule"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.policy.lora" in out and "--model.max_length" in out


def test_print_config_shows_the_loggers_and_callbacks_a_run_uses(tmp_path, capsys):
    import yaml

    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "demo" / "sft.yaml"),
                "--trainer.default_root_dir",
                str(tmp_path),
                "--print_config",
            ]
        )
    assert info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    trainer = config["trainer"]
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in trainer["logger"]] == [
        "CSVLogger",
        "TensorBoardLogger",
    ]
    assert {lg["init_args"]["save_dir"] for lg in trainer["logger"]} == {str(tmp_path)}
    callbacks = [c["class_path"] for c in trainer["callbacks"]]
    assert "lightning.pytorch.callbacks.LearningRateMonitor" in callbacks
    assert "pebr_lightning.callbacks.ProgressBar" in callbacks
    assert not (tmp_path / "lightning_logs").exists()  # printing builds and writes nothing


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("model:\n  init_args: {model: tiny\ntrainer: [\n", ":3:8: not valid YAML"),
        ("model:\n\tclass_path: x\n", ":2:1: not valid YAML"),
    ],
)
def test_bad_yaml_names_the_file_and_line(text, where, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}{where}" in err, err
    assert main(["fit", "--config", str(tmp_path / "none.yaml")]) == 2
    assert f"--config {tmp_path / 'none.yaml'}: no such file" in capsys.readouterr().err


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


def test_fit_with_skip_invalid_trains_on_the_valid_records(tmp_path, shapes_data, sft_fit_args):
    manifest = write_dataset(tmp_path / "data", n=10, seed=0)
    _break(manifest, "missing image")
    with pytest.warns(UserWarning, match=r"skipped 1 invalid record\(s\)"):
        code = main(sft_fit_args(manifest, tmp_path / "run", steps=3, skip_invalid="true"))
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


def _pebr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real console script, offline, in `cwd`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(Path(sys.executable).with_name("pebr")), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_fit_from_a_model_folder_that_is_not_there_says_so(tmp_path, shapes_data):
    """Not transformers' "Repo id must be in the form..." advice: one line, exit 2."""
    (tmp_path / "runs").mkdir()
    result = _pebr(
        "fit",
        "--config",
        str(REPO / "configs" / "demo" / "sft.yaml"),
        "--model.init_args.policy.model",
        "runs/nope/last.hf",
        "--data.init_args.train_manifest",
        str(shapes_data["train"]),
        "--data.init_args.val_manifest",
        "null",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: model folder runs/nope/last.hf does not exist (relative to {tmp_path})" in (
        result.stderr
    )
    assert "Repo id" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_eval_and_sample_from_a_model_folder_that_is_not_there_say_so(
    command, tmp_path, shapes_data, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    argv = [command, "--model", "runs/nope/last.hf", "--manifest", str(shapes_data["val"])]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model folder runs/nope/last.hf does not exist")
    assert "Repo id" not in err


def test_rerunning_a_saved_config_writes_a_new_version(tmp_path, shapes_data, capsys):
    """The saved config.yaml leaves the loggers' version unset: run again, it writes
    version_1 and leaves version_0's logs and checkpoints as they were."""
    common = [
        "--data.init_args.train_manifest",
        str(shapes_data["train"]),
        "--data.init_args.val_manifest",
        "null",
        "--trainer.max_steps",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    assert main(["fit", "--config", str(REPO / "configs" / "demo" / "sft.yaml"), *common]) == 0
    first = tmp_path / "lightning_logs" / "version_0"
    out = capsys.readouterr().out
    assert f"weights:    {first / 'checkpoints' / 'last.hf'}" in out  # fit says where
    saved = (first / "config.yaml").read_text()
    assert saved.count("version: null") == 2, saved
    metrics = (first / "metrics.csv").read_text()
    ckpt = (first / "checkpoints" / "last.ckpt").read_bytes()

    assert main(["fit", "--config", str(first / "config.yaml")]) == 0
    second = tmp_path / "lightning_logs" / "version_1"
    assert (second / "metrics.csv").is_file() and (second / "checkpoints" / "last.ckpt").is_file()
    assert (first / "metrics.csv").read_text() == metrics
    assert (first / "checkpoints" / "last.ckpt").read_bytes() == ckpt
    assert not (first / "checkpoints" / "last-v1.ckpt").exists()
    # the LR monitor is on by default: the learning rate is in the logs
    assert "lr-AdamW" in (second / "metrics.csv").read_text().splitlines()[0]


def _misspelt_reward_args(root: Path, shapes_data) -> list[str]:
    rewards = [{"name": "format", "weight": 0.5}, {"name": "acuracy", "weight": 0.5}]
    return [
        "--config",
        str(REPO / "configs" / "demo" / "reasoning.yaml"),
        "--model.init_args.rewards",
        json.dumps(rewards),
        "--data.init_args.train_manifest",
        str(shapes_data["train"]),
        "--trainer.default_root_dir",
        str(root),
    ]


def test_a_misspelt_reward_stops_before_the_trainer_is_built(tmp_path, shapes_data):
    """GRPOModule's __init__ looks the names up; LightningCLI builds it before the
    Trainer, so nothing is written (jsonargparse wraps the error; its cause is ours)."""
    from pebr_lightning.cli import cli
    from pebr_lightning.errors import wrapped_user_error
    from pebr_lightning.rewards.registry import RewardLookupError

    with pytest.raises(Exception) as info:
        cli(_misspelt_reward_args(tmp_path, shapes_data), run=False)
    cause = wrapped_user_error(info.value)
    assert isinstance(cause, RewardLookupError)
    assert str(cause).startswith("unknown reward 'acuracy'; did you mean 'accuracy'? installed:")
    assert list(tmp_path.iterdir()) == []  # no lightning_logs


def test_a_misspelt_reward_is_one_error_line_from_pebr_fit(tmp_path, shapes_data):
    """The real console script: exit 2, one `error:` line, no traceback, no run folder."""
    result = _pebr("fit", *_misspelt_reward_args(tmp_path / "run", shapes_data), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: unknown reward 'acuracy'; did you mean 'accuracy'? installed: accuracy, "
        "clip_score, format, keyword, length, scene (entry-point group "
        "'pebr_lightning.rewards'; `pebr rewards list` shows where each comes from)"
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "lightning_logs").exists()


def test_pebr_test_without_a_test_manifest_names_the_command_and_prints_no_tip(
    tmp_path, shapes_data, capsys, caplog
):
    caplog.set_level("INFO")
    code = main(
        [
            "test",
            "--config",
            str(REPO / "configs" / "demo" / "sft.yaml"),
            "--data.init_args.train_manifest",
            str(shapes_data["train"]),
            "--data.init_args.num_workers",
            "0",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    # before: "`pebr TrainerFn.TESTING` needs ..." (the enum's repr)
    assert "error: `pebr test` needs data.init_args.test_manifest" in capsys.readouterr().err
    # Lightning logged a litlogger advertisement at every Trainer it built
    assert caplog.records, "the Trainer's own INFO lines are captured"
    assert not [r for r in caplog.records if "litlogger" in r.getMessage()]
