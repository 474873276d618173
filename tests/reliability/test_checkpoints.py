"""Checkpoints that are not there, not whole, or killed while being written."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from pebr_demo.testing import TouchPayload
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
    # SIGXFSZ comes only from a write crossing the limit. The checkpoint is written
    # into a temporary `.NAME.PID.partial` beside it and renamed when complete: the
    # cut file is that temporary one, and there is no checkpoint at all.
    cut = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size >= 4 * 2**20]
    assert cut and all(p.name.startswith(".") and p.name.endswith(".partial") for p in cut)
    assert not list(root.rglob("*.ckpt"))
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
    lora = ["--model.init_args.policy.lora", '{"r": 4, "alpha": 8}']
    run = tmp_path / "r4"
    assert main([*sft_args(shapes_data["train"], run, steps=1), *lora]) == 0
    (ckpt,) = run.rglob("last.ckpt")
    other = ["--model.init_args.policy.lora", '{"r": 8, "alpha": 16}', "--ckpt_path", str(ckpt)]
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
    from pebr_demo.data.synth import write_dataset

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


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB tmpfs: one step's checkpoints (~20 MB) fit, a second set does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_whole(small_disk, shapes_data):
    """Step 1's checkpoints fill most of a real 24 MB tmpfs; step 2's first one runs out
    of space half-way (ENOSPC). Before, Lightning wrote into the system temp folder and
    copied onto the run folder, leaving a cut file where a good one had been. Now the
    temporary file is beside the target and removed on failure: every checkpoint left
    reads whole, step 1's last.ckpt is intact, and `--ckpt_path last` resumes from it
    once there is room."""
    root = small_disk / "run"
    done = subprocess.run(
        [sys.executable, "-m", "pebr_lightning.cli", *sft_args(shapes_data["train"], root)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot write") and "No space left" in last_line
    assert "files written before are intact" in last_line
    for ckpt in root.rglob("*.ckpt"):
        assert torch.load(ckpt, weights_only=True)["global_step"] == 1, ckpt
    assert not [p for p in root.rglob("*partial*")]  # the cut temporary file was removed
    (last, *_) = sorted(root.rglob("last.ckpt"))

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    assert main([*sft_args(shapes_data["train"], root), "--ckpt_path", "last"]) == 0
    newest = max(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    assert newest != last and torch.load(newest, weights_only=True)["global_step"] == 2


def test_last_skips_an_unreadable_newest_checkpoint(tmp_path, shapes_data, capsys):
    """A cut `last.ckpt` in the newest run version (written by another tool, or before
    this fix) is skipped with a message; the previous readable one is resumed."""
    from pebr_lightning.cli import resolve_last

    root = tmp_path / "run"
    assert main(sft_args(shapes_data["train"], root, steps=1)) == 0
    (good,) = root.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    newer = root / "lightning_logs" / "version_1" / "checkpoints"
    newer.mkdir(parents=True)
    data = good.read_bytes()
    (newer / "last.ckpt").write_bytes(data[: len(data) // 3])
    (newer / ".last.ckpt.4242.partial").write_bytes(data)  # a temporary name: never used
    capsys.readouterr()
    assert resolve_last(root) == str(good)
    err = capsys.readouterr().err
    assert f"skipping an unreadable checkpoint: {newer / 'last.ckpt'}: not a readable" in err
    assert f"resuming from {good}" in err


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from pebr_lightning.callbacks.checkpoint_io import remove_stale_partials

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    target = tmp_path / "last.ckpt"
    stale = tmp_path / f".last.ckpt.{int(dead.stdout)}.partial"
    live = tmp_path / f".last.ckpt.{os.getpid()}.partial"
    other = tmp_path / f".epoch=0-step=1.ckpt.{int(dead.stdout)}.partial"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert remove_stale_partials(target) == [stale]
    assert live.exists() and other.exists() and not stale.exists()


def test_killed_between_checkpoint_and_its_hf_folder(tmp_path, shapes_data):
    """Killed after writing step 2's last.ckpt, before swapping in its last.hf (real
    SIGKILL at that point): the re-run resumes at max_steps, takes no step, and writes
    last.hf again from the checkpoint's weights instead of keeping step 1's."""
    from safetensors.torch import load_file

    from pebr_lightning.callbacks.checkpoint import hf_step

    root = tmp_path / "run"

    def args(kill_at: int) -> list[str]:
        kill = {
            "class_path": "pebr_demo.testing.KillBeforeHFSwap",
            "init_args": {"step": kill_at, "every_n_train_steps": 1, "save_last": True},
        }
        # the only checkpoint callback (the config's own would write a second last.ckpt)
        return [
            *sft_args(shapes_data["train"], root)[:-3],
            "--trainer.callbacks",
            json.dumps([kill]),
        ]

    done = subprocess.run(
        [sys.executable, "-m", "pebr_lightning.cli", *args(2)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (ckpt,) = root.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    hf = ckpt.with_name("last.hf")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    assert hf_step(hf) == 1 and ckpt.with_name("last.hf.partial").is_dir()  # the stale state

    assert main([*args(0), "--ckpt_path", "last"]) == 0
    assert hf_step(hf) == 2 and not ckpt.with_name("last.hf.partial").exists()
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    saved = load_file(hf / "model.safetensors")
    ours = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    torch.testing.assert_close(saved["model.embed_tokens.weight"], ours, rtol=0, atol=0)


def test_a_pickle_payload_is_refused_naming_it_without_torchs_unsafe_advice(
    tmp_path, shapes_data, capsys
):
    """torch's refusal begins with "Re-running torch.load with weights_only set to
    False will likely succeed": advice that must never reach a user. The reason shown is
    the object the file asked for."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": TouchPayload(marker)}}, evil)
    assert main([*sft_args(shapes_data["train"], tmp_path / "run"), "--ckpt_path", str(evil)]) == 2
    err = capsys.readouterr().err
    assert f"error: {evil}: not a readable checkpoint (" in err
    assert "GLOBAL posix.system" in err
    assert "weights_only" not in err and "Re-running" not in err
    assert not marker.exists()


def test_a_sharded_folder_given_to_a_single_process_fit_is_a_clear_error(
    tmp_path, shapes_data, capsys
):
    """Before: IsADirectoryError with a traceback from deep in Lightning."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint_id=folder)
    torch.save({"global_step": 1, "hyper_parameters": {}}, folder / "meta.pt")
    code = main([*sft_args(shapes_data["train"], tmp_path / "run"), "--ckpt_path", str(folder)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {folder}: a sharded checkpoint folder (written by FSDP2Strategy)" in err
    assert "Traceback" not in err and "IsADirectoryError" not in err


def test_a_full_disk_during_the_hf_write_is_one_line_and_leaves_no_partial(small_disk, shapes_data):
    """The disk fills after step 1's `.ckpt`, during its `.hf` folder (safetensors says
    so as a SafetensorError, not an OSError). Before: a traceback, exit 1, and
    `last.hf.partial` left on the full disk. Now: the one-line full-disk error, exit 2,
    the partial folder removed, the `.ckpt` whole."""
    root = small_disk / "run"
    fill = {
        "class_path": "pebr_demo.testing.FillDiskBeforeHF",
        "init_args": {"step": 1, "every_n_train_steps": 1, "save_last": True},
    }
    args = [
        *sft_args(shapes_data["train"], root, steps=1)[:-3],
        "--trainer.callbacks+",
        json.dumps(fill),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pebr_lightning.cli", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot write") and "No space left" in last_line
    assert ".hf.partial" in last_line and "Traceback" not in done.stderr
    assert not [p for p in root.rglob("*partial*")]
    for ckpt in root.rglob("*.ckpt"):
        assert torch.load(ckpt, weights_only=True)["global_step"] == 1


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(
    small_disk, tmp_path, shapes_data, capsys
):
    root = tmp_path / "run"
    assert main(sft_args(shapes_data["train"], root, steps=1)) == 0
    (ckpt,) = root.rglob("last.ckpt")
    with open(small_disk / "filler", "wb") as filler:  # leave about 1 MB
        stats = os.statvfs(small_disk)
        filler.write(b"\0" * (stats.f_bavail * stats.f_frsize - (1 << 20)))
    out = small_disk / "export"
    capsys.readouterr()
    assert main(["export", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "No space left" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # nothing half-written
