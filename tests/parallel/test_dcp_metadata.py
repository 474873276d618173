"""A sharded checkpoint's `.metadata` is read without running anything it names.

DCP pickles it; a crafted file whose unpickling calls `os.system` must be refused by
`pebr export DIR`, `pebr fit --ckpt_path DIR` and `FSDP2Strategy.load_checkpoint`,
before any of its bytes are unpickled the ordinary way, and a real one must still load.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pebr_demo.testing import TouchPayload
from pebr_lightning.cli import main
from pebr_lightning.errors import PebrError
from pebr_lightning.parallel import FSDP2Strategy
from pebr_lightning.parallel.dcp_metadata import SafeFileSystemReader, read_dcp_metadata

REPO = Path(__file__).resolve().parents[2]


def real_folder(folder: Path) -> Path:
    """A real DCP folder: float32 and bf16 tensors, plain values, optimizer state."""
    state = {
        "state_dict": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
        "optimizer_0": {"state": {"w": {"exp_avg": torch.ones(3, 4), "step": torch.tensor(2.0)}},
                        "param_groups": [{"lr": 0.1, "params": ["w"]}]},
    }  # fmt: skip
    dcp.save(state, checkpoint_id=folder)
    torch.save({"epoch": 0, "global_step": 2, "hyper_parameters": {"lr": 0.1}}, folder / "meta.pt")
    return folder


def crafted_folder(folder: Path, marker: Path) -> Path:
    real_folder(folder)
    (folder / ".metadata").write_bytes(pickle.dumps(TouchPayload(marker)))
    return folder


def test_a_real_metadata_file_reads_the_same_as_dcp_reads_it(tmp_path) -> None:
    folder = real_folder(tmp_path / "ckpt")
    ours = read_dcp_metadata(folder)
    theirs = dcp.FileSystemReader(folder).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.planner_data == theirs.planner_data
    # and DCP loads through the safe reader into fresh tensors
    target = {"state_dict": {"w": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}}
    dcp.load(target, storage_reader=SafeFileSystemReader(folder))
    saved = {"state_dict": {"w": torch.empty(3, 4), "b": torch.empty(2, dtype=torch.bfloat16)}}
    dcp.load(saved, checkpoint_id=folder)
    assert torch.equal(target["state_dict"]["w"], saved["state_dict"]["w"])
    assert torch.equal(target["state_dict"]["b"], torch.zeros(2, dtype=torch.bfloat16))


def test_the_reader_refuses_a_payload_and_names_what_it_asked_for(tmp_path) -> None:
    marker = tmp_path / "ran"
    folder = crafted_folder(tmp_path / "ckpt", marker)
    with pytest.raises(PebrError, match=r"\.metadata: refused to load: it asks for posix\.system"):
        read_dcp_metadata(folder)
    with pytest.raises(PebrError, match="refused to load"):
        SafeFileSystemReader(folder).read_metadata()
    assert not marker.exists()


def test_export_refuses_a_crafted_sharded_folder_without_running_it(tmp_path, capsys) -> None:
    marker = tmp_path / "ran"
    folder = crafted_folder(tmp_path / "last.ckpt", marker)
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {folder / '.metadata'}: refused to load" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_fit_refuses_a_crafted_sharded_folder_before_anything_loads(
    tmp_path, shapes_data, capsys
) -> None:
    marker = tmp_path / "ran"
    folder = crafted_folder(tmp_path / "last.ckpt", marker)
    code = main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "demo" / "sft.yaml"),
            "--data.init_args.train_manifest",
            str(shapes_data["train"]),
            "--data.init_args.val_manifest",
            str(shapes_data["val"]),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--ckpt_path",
            str(folder),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "refused to load: it asks for posix.system" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_the_fsdp2_strategy_checks_before_lightning_unpickles(tmp_path) -> None:
    """For runs built in Python (no CLI): the strategy's own load refuses first."""
    marker = tmp_path / "ran"
    folder = crafted_folder(tmp_path / "last.ckpt", marker)
    with pytest.raises(PebrError, match="refused to load"):
        FSDP2Strategy().load_checkpoint(folder)
    assert not marker.exists()
