"""Read a sharded checkpoint's `.metadata` without running code from it.

A sharded (FSDP2, `save_distributed_checkpoint=True`) checkpoint folder holds
torch distributed-checkpoint shards, Lightning's `meta.pt` and DCP's `.metadata`,
which DCP writes and reads with plain `pickle`: unpickling a crafted file runs
whatever it names (`os.system`, ...). `meta.pt` goes through
`torch.load(weights_only=True)`; this module gives `.metadata` the same treatment:
an unpickler that builds only the classes DCP's metadata is made of (listed in
ALLOWED, plus torch dtypes, layouts and `torch.Size`) and refuses anything else
with an error naming the file and the object it asked for.

`SafeFileSystemReader` is DCP's `FileSystemReader` with that reader, for
`torch.distributed.checkpoint.load(..., storage_reader=...)`; `read_dcp_metadata`
also verifies a folder before code that reads it the ordinary way (Lightning's
`ModelParallelStrategy.load_checkpoint`) gets to it.
"""

from __future__ import annotations

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


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader, reading `.metadata` with the safe unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = read_dcp_metadata(path.parent, path.name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
