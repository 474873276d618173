"""A sharded checkpoint's *bytes items* are read as plain data, never unpickled freely.

DCP stores every non-tensor value of a saved state (an optimizer's `lr`, `betas`, ...)
as a `torch.save`d bytes item, and its default planner reads them back with
`torch.load(weights_only=False)`: a payload planted there runs under a clean
`.metadata`. These tests write a real sharded checkpoint with 2 FSDP2 processes,
show that it still resumes exactly, then plant payloads in its optimizer state and
in a model entry and check that resume and `pebr export` refuse them, naming the
folder and the entry, with nothing run.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from pebr_demo.testing import TouchPayload
from pebr_demo.testing.processes import torchrun_fit
from pebr_lightning.cli import main
from pebr_lightning.parallel.dcp_metadata import read_dcp_metadata

REPO = Path(__file__).resolve().parents[2]


# A checkpoint folder every 2 steps, each kept (epoch=0-step=2.ckpt, ...), and last.hf.
EVERY_2 = json.dumps(
    [
        {
            "class_path": "pebr_lightning.callbacks.HFCheckpoint",
            "init_args": {"save_last": True, "save_top_k": -1, "every_n_train_steps": 2},
        }
    ]
)


def sft_args(train: Path, root: Path, steps: int) -> list[str]:
    return [
        "--config",
        str(REPO / "configs/demo/sft.yaml"),
        "--data.init_args.train_manifest",
        str(train),
        "--data.init_args.val_manifest",
        "null",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "4",
        "--trainer.max_steps",
        str(steps),
        "--trainer.callbacks",
        EVERY_2,
        "--trainer.default_root_dir",
        str(root),
    ]


def fit(args: list[str]):
    done = torchrun_fit(args, nproc=2)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shapes_data) -> Path:
    """A real 2-process FSDP2 SFT run of 4 steps, sharded checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("fsdp-straight")
    code, out = fit(sft_args(shapes_data["train"], root, 4))
    assert code == 0, out[-6000:]
    return root


@pytest.fixture(scope="module")
def sharded(straight) -> Path:
    """Its step-2 checkpoint: a folder of 2 shards, `.metadata` and `meta.pt`."""
    (ckpt,) = straight.rglob("*step=2.ckpt")
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    return ckpt


def planted(clean: Path, folder: Path, plant) -> Path:
    """`clean` re-saved with `plant(state)` applied: the same entries, one a payload."""
    gathered = folder.with_suffix(".pt")
    dcp_to_torch_save(clean, gathered)  # our own clean checkpoint: trusted
    state = torch.load(gathered, weights_only=False)
    plant(state)
    dcp.save(state, checkpoint_id=folder)
    shutil.copy(clean / "meta.pt", folder / "meta.pt")
    return folder


def test_a_sharded_checkpoint_resumes_to_the_weights_of_a_straight_run(
    straight, sharded, shapes_data, tmp_path
) -> None:
    resumed = tmp_path / "resumed"
    code, out = fit([*sft_args(shapes_data["train"], resumed, 4), "--ckpt_path", str(sharded)])
    assert code == 0, out[-6000:]
    a = load_file(next(resumed.rglob("last.hf/model.safetensors")))
    b = load_file(next(straight.rglob("last.hf/model.safetensors")))
    first = load_file(sharded.with_suffix(".hf") / "model.safetensors")
    assert any(not torch.equal(a[k], first[k]) for k in a)  # it trained after resuming
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_resume_refuses_a_payload_in_the_optimizer_state(sharded, shapes_data, tmp_path) -> None:
    marker = tmp_path / "ran"

    def plant(state: dict) -> None:
        state["optimizer_0"]["param_groups"][0]["lr"] = TouchPayload(marker)

    folder = planted(sharded, tmp_path / "last.ckpt", plant)
    run = tmp_path / "run"
    code, out = fit([*sft_args(shapes_data["train"], run, 4), "--ckpt_path", str(folder)])
    assert code != 0
    assert f"error: {folder}: refused to load entry 'optimizer_0.param_groups.0.lr'" in out
    assert "Traceback" not in out.split("error:")[1][:400]
    assert not marker.exists()
    assert not list(run.rglob("last.hf"))  # nothing trained or written over


def decoy_folder(clean: Path, folder: Path, marker: Path) -> Path:
    """`clean` with one weight turned into a bytes item holding a payload, and a decoy
    entry that maps to the same weight with its real tensor shape: a check of names
    and shapes over `.metadata` sees every weight in place."""
    shutil.copytree(clean, folder)
    meta = read_dcp_metadata(folder)
    key = next(k for k, v in meta.state_dict_metadata.items() if k.startswith("state_dict."))
    blob = io.BytesIO()
    torch.save(TouchPayload(marker), blob)
    (folder / "__payload.distcp").write_bytes(blob.getvalue())
    meta.state_dict_metadata["decoy"] = meta.state_dict_metadata[key]  # listed after `key`
    meta.planner_data["decoy"] = meta.planner_data[key]
    meta.state_dict_metadata[key] = BytesStorageMetadata()
    for index in [i for i in meta.storage_data if i.fqn == key]:
        del meta.storage_data[index]
    meta.storage_data[MetadataIndex(key)] = _StorageInfo(
        "__payload.distcp", 0, len(blob.getvalue())
    )
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    return folder


def test_export_refuses_a_payload_behind_a_decoy_entry(sharded, tmp_path, capsys) -> None:
    marker = tmp_path / "ran"
    folder = decoy_folder(sharded, tmp_path / "last.ckpt", marker)
    out = tmp_path / "out"
    assert main(["export", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {folder}: refused to load entry 'state_dict." in err
    assert "Traceback" not in err
    assert not marker.exists() and not out.exists()


def test_a_sharded_checkpoint_holding_nan_is_refused_by_resume_and_export(
    sharded, shapes_data, tmp_path, capsys
) -> None:
    """One NaN in one rank's shard: every rank stops (the other one is told), exit != 0,
    nothing trained on it; `pebr export` refuses the folder too."""

    def plant(state: dict) -> None:
        key = next(k for k in state["state_dict"] if k.endswith("layers.0.mlp.up_proj.weight"))
        state["state_dict"][key][0, 0] = float("nan")

    folder = planted(sharded, tmp_path / "last.ckpt", plant)
    run = tmp_path / "run"
    code, out = fit([*sft_args(shapes_data["train"], run, 4), "--ckpt_path", str(folder)])
    assert code != 0
    assert "1 weight tensor(s) hold NaN or inf (" in out  # the rank holding it names it
    assert "weight shard(s) on other ranks hold NaN or inf" in out
    assert not list(run.rglob("last.hf"))
    out_dir = tmp_path / "export"
    assert main(["export", str(folder), "--out", str(out_dir)]) == 2
    assert "hold NaN or inf" in capsys.readouterr().err
    assert not out_dir.exists()


def test_a_truncated_shard_is_one_line_naming_the_folder(sharded, tmp_path, capsys) -> None:
    """Before: DCP's CheckpointException derives from BaseException and went past every
    handler: a traceback from `pebr export`."""
    folder = tmp_path / "cut.ckpt"
    shutil.copytree(sharded, folder)
    shard = sorted(folder.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1024])  # the weights of this rank cut off
    out = tmp_path / "out"
    assert main(["export", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder}: cannot read the shards: ")
    assert "Traceback" not in err and not out.exists()
