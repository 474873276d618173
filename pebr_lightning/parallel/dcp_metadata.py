"""Read a sharded checkpoint's `.metadata` without running code from it.

A sharded (FSDP2, `save_distributed_checkpoint=True`) checkpoint folder holds
torch distributed-checkpoint shards, Lightning's `meta.pt` and DCP's `.metadata`,
which DCP writes and reads with plain `pickle`: unpickling a crafted file runs
whatever it names (`os.system`, ...). `meta.pt` goes through
`torch.load(weights_only=True)`; this module gives `.metadata` the same treatment:
an unpickler that builds only the classes DCP's metadata is made of (listed in
ALLOWED, plus torch dtypes, layouts and `torch.Size`) and refuses anything else
with an error naming the file and the object it asked for.

The shards themselves hold tensors and "bytes items": any non-tensor value of the
saved state (an optimizer's `lr`, a step count) is `torch.save`d on its own, and
DCP's default planner reads each back with `torch.load(weights_only=False)`, so a
bytes item is a second door to the same attack even under a clean `.metadata`.
`SafeFileSystemReader` (DCP's `FileSystemReader` for
`torch.distributed.checkpoint.load(..., storage_reader=...)`) closes both: it reads
`.metadata` with the unpickler below, and hands the planner a bytes item only after
`torch.load(weights_only=True)` accepted it. `load_sharded_state` is the one way this
package reads a sharded folder (`pebr export`, FSDP2 resume); it turns DCP's
`CheckpointException` (a `BaseException`) into an error naming the folder.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from pebr_lightning.errors import PebrError

METADATA_FILE = ".metadata"

# (module, name) pairs a DCP .metadata file is built from: the metadata dataclasses,
# the per-file storage record, enum of memory formats, and pathlib for checkpoint_id.
ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps "torch.strided" etc. to a layout
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only ALLOWED classes and torch dtypes; anything else is refused."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise PebrError(
            f"{self.path}: refused to load: it asks for {module}.{name}, which a "
            "distributed checkpoint's metadata never holds (a crafted or foreign file; "
            "nothing from it was run)"
        )


def read_dcp_metadata(folder: str | Path, name: str = METADATA_FILE) -> Metadata:
    """The `Metadata` of the sharded checkpoint in `folder`, read with the safe unpickler."""
    path = Path(folder) / name
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except PebrError:
        raise
    except FileNotFoundError:
        raise PebrError(f"{path}: missing: not a complete sharded checkpoint") from None
    except Exception as err:  # truncated or garbage bytes fail in many ways
        raise PebrError(f"{path}: cannot read: {type(err).__name__}: {err}") from None
    if not isinstance(metadata, Metadata):
        raise PebrError(
            f"{path}: not distributed-checkpoint metadata (a {type(metadata).__name__})"
        )
    return metadata


class _WeightsOnlyBytes:
    """A load planner as DCP gave it, except that a bytes item reaches its `load_bytes`
    only after `torch.load(weights_only=True)` read it: the same pickle stream then
    holds nothing but tensors and plain data, whoever unpickles it next."""

    def __init__(self, planner: Any, folder: Path) -> None:
        self._planner = planner
        self._folder = folder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        entry = read_item.dest_index.fqn
        try:
            torch.load(value, weights_only=True)
        except Exception as err:  # UnpicklingError for a refused global; others for garbage
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PebrError(
                f"{self._folder}: refused to load entry {entry!r}: it is not plain data "
                f"({type(err).__name__}: {reason}); nothing from it was run"
            ) from None
        value.seek(0)
        self._planner.load_bytes(read_item, value)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader: `.metadata` through the safe unpickler, bytes items
    through `torch.load(weights_only=True)` before the planner sees them."""

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, _WeightsOnlyBytes(planner, Path(str(self.path))))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = read_dcp_metadata(path.parent, path.name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_sharded_state(state: dict[str, Any], folder: str | Path) -> None:
    """`torch.distributed.checkpoint.load(state)` from `folder` through the safe reader.

    DCP reports a reader's failure as a `CheckpointException`, which derives from
    `BaseException` and slips past `except Exception`: it is unwrapped here into the
    PebrError the reader raised, or one naming the folder and the first failure.
    """
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load(state, storage_reader=SafeFileSystemReader(folder))
    except CheckpointException as err:
        failures = [exc[0] if isinstance(exc, tuple) else exc for exc in err.failures.values()]
        for failure in failures:
            if isinstance(failure, PebrError):
                raise failure from None
        first = failures[0] if failures else err
        lines = str(first).strip().splitlines()
        raise PebrError(
            f"{folder}: cannot read the shards: {type(first).__name__}: {lines[0] if lines else ''}"
        ) from None
