"""Output files: written whole (files.py) and with the modes a plain open() would give."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pebr_lightning.files import use_default_modes, write_atomic, write_atomic_with


@pytest.fixture
def umask():
    """`umask(mask)` sets the process umask for this test; the old one comes back after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_take_their_mode_from_the_umask(umask, tmp_path, mask, expected):
    umask(mask)
    assert mode(write_atomic(tmp_path / "a.json", "{}\n")) == expected
    assert mode(write_atomic_with(tmp_path / "b.bin", lambda f: f.write(b"x"))) == expected
    replaced = write_atomic(tmp_path / "a.json", "[]\n")  # a rewrite too
    assert mode(replaced) == expected and replaced.read_text() == "[]\n"


def test_default_modes_undo_what_safetensors_and_mkdtemp_make(umask, tmp_path):
    """safetensors writes 0o600 and mkdtemp makes 0o700 whatever the umask: a model
    folder written that way is the owner's alone until use_default_modes."""
    umask(0o022)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "sub").mkdir()
    save_file({"w": torch.zeros(2)}, folder / "sub" / "model.safetensors")
    assert mode(folder) == 0o700 and mode(folder / "sub" / "model.safetensors") == 0o600
    use_default_modes(folder)
    assert mode(folder) == mode(folder / "sub") == 0o755
    assert mode(folder / "sub" / "model.safetensors") == 0o644


def test_a_deleted_lock_file_does_not_let_a_second_run_in(tmp_path) -> None:
    """Before: the lock was the file's alone, so deleting OUT/.pebr.lock while a schedule
    held it let a second one create a new file, lock it and run beside the first."""
    import subprocess
    import sys
    import time

    from pebr_lightning.errors import PebrError
    from pebr_lightning.files import LOCK_FILE, exclusive_lock

    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, pathlib\n"
         "from pebr_lightning.files import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], 'pebr schedule'):\n"
         "    pathlib.Path(sys.argv[2]).touch()\n"
         "    time.sleep(120)\n",
         str(tmp_path), str(ready)],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        (tmp_path / LOCK_FILE).unlink()
        refused = pytest.raises(PebrError, match="is in use by another pebr schedule")
        with refused, exclusive_lock(tmp_path, "pebr schedule"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(tmp_path, "pebr schedule", echo=lambda line: None):
        pass  # free again once the holder is gone
