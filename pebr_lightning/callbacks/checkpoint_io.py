"""Lightning checkpoint files written beside their destination, then renamed.

Lightning's own `TorchCheckpointIO` writes through an fsspec transaction whose
temporary file lives in the system temp folder; committing it "renames" it onto the
run's folder, which across filesystems is a copy. A full disk cut that copy short and
left a truncated `last.ckpt` where a good one had been (docs/RELIABILITY.md). Here the
temporary file is in the destination folder: it is written and fsynced completely,
then renamed over the old checkpoint in one step, so the previous checkpoint stays
readable until the new one is whole, and a failed write leaves nothing behind.

`pebr fit` installs it (cli.py) unless the config names another CheckpointIO; in
Python: `Trainer(plugins=[AtomicCheckpointIO()])`. Remote paths (`s3://...`) go
through Lightning's default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pebr_lightning.files import process_alive, write_atomic_with


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are complete-or-absent (temp file + rename)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
        write_atomic_with(path, lambda f: save_to(checkpoint, f))


def save_to(checkpoint: dict[str, Any], f: Any) -> None:
    """torch.save into an open file, re-raising a failed write as the OSError it was.

    torch's zip writer turns a failed write into RuntimeError("unexpected pos ...");
    the errno (ENOSPC, EFBIG) is what tells the user the disk is full.
    """
    failed: list[OSError] = []

    class Recording:
        def write(self, data: Any) -> int:
            try:
                return f.write(data)
            except OSError as err:
                failed.append(err)
                raise

        def flush(self) -> None:
            f.flush()

    try:
        torch.save(checkpoint, Recording())
    except RuntimeError:
        if failed:
            raise failed[0] from None
        raise


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete temporary files of `path` left by processes that are gone (killed mid-write).

    They are named `.NAME.PID.partial` (files.write_atomic_with); one whose process
    still runs is another writer's and is left alone.
    """
    removed = []
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        pid = stale.name[len(path.name) + 2 : -len(".partial")]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed
