"""Checkpoints that are not there, not whole, or killed while being written."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from pebr_lightning.cli import main

REPO = Path(__file__).resolve().parents[2]


def sft_args(train: Path, root: Path, steps: int = 2) -> list[str]:
    return [
        "fit",
        "--config", str(REPO / "configs/demo/sft.yaml"),
        "--data.init_args.train_manifest", str(train),
        "--data.init_args.val_manifest", "null",
        "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0",
        "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=pebr_lightning.callbacks.HFCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "not a readable checkpoint"),
        (lambda p: p.write_text("not a checkpoint"), "not a readable checkpoint"),
        (lambda p: None, "no such checkpoint"),
        (lambda p: p.mkdir(), "incomplete sharded checkpoint"),
    ],
    ids=["empty", "text", "missing", "folder-without-shards"],
)
def test_unusable_checkpoint_is_one_clear_error(make, message, tmp_path, shapes_data, capsys):
    ckpt = tmp_path / "bad.ckpt"
    make(ckpt)
    code = main([*sft_args(shapes_data["train"], tmp_path), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {ckpt}: {message}" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.hf"))  # nothing trained, nothing written


def test_truncated_checkpoint_names_the_file(tmp_path, shapes_data, capsys):
    run = tmp_path / "run"
    assert main(sft_args(shapes_data["train"], run, steps=1)) == 0
    (good,) = run.rglob("last.ckpt")
    data = good.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    assert main([*sft_args(shapes_data["train"], tmp_path / "r2"), "--ckpt_path", str(cut)]) == 2
    assert f"error: {cut}: not a readable checkpoint" in capsys.readouterr().err


def test_write_failing_mid_checkpoint_leaves_no_truncated_one(tmp_path, shapes_data):
    """The full tiny model's checkpoint (weights + AdamW moments) is ~7.5 MB: under a
    4 MB file-size limit its write fails half-way (EFBIG, as a full disk gives ENOSPC).
    The run stops with one clear line, no `last.ckpt` is left half-written, and
    `--ckpt_path last` afterwards starts afresh instead of failing on it."""
    root = tmp_path / "run"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))

    done = subprocess.run(
        [sys.executable, "-m", "pebr_lightning.cli", *sft_args(shapes_data["train"], root)],
        preexec_fn=limit,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot write") and "disk full" in last_line
    for ckpt in root.rglob("*.ckpt"):  # any checkpoint left must load completely
        torch.load(ckpt, weights_only=True)
    assert not list(root.rglob("last.ckpt"))
    assert not [p for p in root.rglob("*.hf") if p.name == "last.hf"]

    assert main([*sft_args(shapes_data["train"], root), "--ckpt_path", "last"]) == 0
    (ckpt,) = root.rglob("last.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2


# Python ignores SIGXFSZ at start-up (a write past the limit then fails with EFBIG);
# restored to the default, the kernel kills the process inside that write().
KILLED_BY_LIMIT = (
    "import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
    "from pebr_lightning.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_killed_inside_a_checkpoint_write_leaves_no_truncated_one(tmp_path, shapes_data):
    """SIGXFSZ kills the process in the middle of writing the ~7.5 MB checkpoint
    (4 MB limit): a crash mid-write, as a pre-emption at the wrong moment gives."""
    root = tmp_path / "run"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))

    done = subprocess.run(
        [sys.executable, "-c", KILLED_BY_LIMIT, *sft_args(shapes_data["train"], root)],
        preexec_fn=limit,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == -signal.SIGXFSZ, done.stderr[-2000:]  # killed, not an error
    # SIGXFSZ comes only from a write crossing the limit. Lightning writes into a
    # temporary file (fsspec: in the system temp folder) and moves it when complete:
    # nothing under the run folder was cut, and there is no last.ckpt at all.
    for path in root.rglob("*"):
        assert not path.is_file() or path.stat().st_size < 4 * 2**20, path
    assert not list(root.rglob("last.ckpt"))
    assert main([*sft_args(shapes_data["train"], root), "--ckpt_path", "last"]) == 0
    (ckpt,) = root.rglob("last.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2


def test_checkpoint_class_path_is_compared_never_imported(tmp_path, shapes_data, capsys):
    """LightningCLI alone would parse `_class_path` from the checkpoint, importing it."""
    probe = "pebr_never_imported_probe.Module"
    ckpt = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": {"_class_path": probe}, "state_dict": {}}, ckpt)
    code = main([*sft_args(shapes_data["train"], tmp_path), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"written by {probe}, but the config trains pebr_lightning.modules.sft" in err
    assert "pebr_never_imported_probe" not in sys.modules


def test_resuming_another_stage_checkpoint_is_refused(tmp_path, shapes_data, capsys):
    run = tmp_path / "sft"
    assert main(sft_args(shapes_data["train"], run, steps=1)) == 0
    (ckpt,) = run.rglob("last.ckpt")
    grpo = [
        "fit", "--config", str(REPO / "configs/demo/reasoning.yaml"),
        "--data.init_args.train_manifest", str(shapes_data["train"]),
        "--trainer.default_root_dir", str(tmp_path / "grpo"), "--ckpt_path", str(ckpt),
    ]  # fmt: skip
    assert main(grpo) == 2
    assert "resume a checkpoint of the same stage" in capsys.readouterr().err


def test_checkpoint_of_another_lora_rank_is_refused(tmp_path, shapes_data, capsys):
    """LoRA checkpoints load non-strictly (they hold the adapter only); a rank-4
    adapter must not load into a rank-8 run as if nothing were wrong."""
    lora = ["--model.init_args.lora", '{"r": 4, "alpha": 8}']
    run = tmp_path / "r4"
    assert main([*sft_args(shapes_data["train"], run, steps=1), *lora]) == 0
    (ckpt,) = run.rglob("last.ckpt")
    other = ["--model.init_args.lora", '{"r": 8, "alpha": 16}', "--ckpt_path", str(ckpt)]
    assert main([*sft_args(shapes_data["train"], tmp_path / "r8"), *other]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "shape mismatch" in err


class BreakImagesAfterFirstStep(L.Callback):
    """Overwrites every training image with garbage once step 1 is done (after the
    start-up validation read them fine), as a failing disk or a sync job might."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            for record in trainer.datamodule.datasets["train"].records:
                Path(record["image"]).write_bytes(b"not a png any more")


def test_image_unreadable_mid_run_names_sample_and_keeps_checkpoints(tmp_path, capsys):
    from pebr_lightning.data.synth import write_dataset

    train = write_dataset(tmp_path / "data", n=8, seed=0)  # private copy: it gets broken
    run = tmp_path / "run"
    args = sft_args(train, run, steps=3)
    code = main([*args, f"--trainer.callbacks+={__name__}.BreakImagesAfterFirstStep"])
    err = capsys.readouterr().err
    assert code == 2
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert line.startswith("error: sample ") and "cannot read image" in line
    assert "--ckpt_path last" in line and "Traceback" not in err
    (ckpt,) = run.rglob("last.ckpt")  # the step before the failure is kept
    assert torch.load(ckpt, weights_only=True)["global_step"] == 1
