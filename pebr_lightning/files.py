"""Writing output files so that a crash or a full disk never leaves half of one."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

LOCK_FILE = ".pebr.lock"


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to a temporary file beside `path`, force it to disk, then rename.

    Readers (and a resumed run) see the old file or the new one, never part of one.
    The temporary name carries the process id, so ranks writing the same file do not
    collide; plain open() (not tempfile.mkstemp, which makes 0o600 files) keeps the
    user's umask for the file mode.
    """
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    return write_atomic_with(path, lambda f: f.write(raw))


def write_atomic_with(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """`write(file)` into a temporary file in `path`'s folder, fsync, rename over `path`.

    The temporary file is in the destination folder, so the final rename is a rename
    on one filesystem (atomic), never a copy that a full disk can cut short; on any
    failure it is removed and `path` keeps its previous content. The folder is
    synced after the rename, so the new name survives a power cut too.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    return path


def current_umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it: set and put back at once
    os.umask(mask)
    return mask


def use_default_modes(root: str | Path) -> None:
    """Give `root` (a file, or a folder and all under it) the modes open() and mkdir()
    would: 0o666 / 0o777 less the umask.

    safetensors creates its files 0o600 and tempfile.mkdtemp its folders 0o700, so
    without this a model folder written for others to read (an export, the embedded
    model cache) is readable by its owner only.
    """
    mask = current_umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def sync_folder(folder: str | Path) -> None:
    """fsync a folder (its entries: renames, new files); a no-op where not supported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@contextmanager
def exclusive_lock(
    folder: str | Path, purpose: str, echo: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold `folder`/.pebr.lock exclusively while the block runs, or fail at once.

    A second run on the same output folder would read the first one's half-made
    outputs and write beside them; it stops instead with an error naming the process
    that holds the lock. The lock is the kernel's (flock), so it ends with its
    process, however that ends; the file keeps the holder's id, and a run that finds
    the id of a process that is gone says it takes the folder over.
    """
    import fcntl

    from pebr_lightning.errors import PebrError

    path = Path(folder) / LOCK_FILE
    # The folder itself is locked, not only the file: a lock file deleted while held
    # would let the next run create a new one and lock that.
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fd = -1
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(folder_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise PebrError(
                f"{folder} is in use by another {purpose} (process {holder or 'unknown'}); "
                "wait for it to finish, or give this run another output folder"
            ) from None
        previous = _holder(fd)
        if previous and previous != os.getpid() and not process_alive(previous):
            echo(
                f"{folder}: taking over from process {previous}, which stopped without "
                "finishing (its finished stages are kept; an interrupted one resumes)"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean end leaves no holder behind
    finally:
        if fd != -1:
            os.close(fd)  # closing releases the flocks
        os.close(folder_fd)


def _holder(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def cache_dir() -> Path:
    """Where embedded models are kept: `$PEBR_CACHE` or `~/.cache/pebr_lightning`."""
    # An empty value counts as unset: Path("") would be the working directory.
    return Path(os.environ.get("PEBR_CACHE") or Path.home() / ".cache" / "pebr_lightning")


# errno values that mean "no room": disk full, file too large, quota exceeded.
_NO_ROOM = {28: "No space left on device", 27: "File too large", 122: "Disk quota exceeded"}


def no_room_error(err: BaseException, path: str | Path) -> OSError | None:
    """The OSError to report when `err`, raised while writing `path`, means the disk (or
    a quota) is full; None otherwise. Libraries that write through their own code say so
    without an OSError: safetensors raises `SafetensorError("... No space left on device
    (os error 28)")`, which would reach the user as a traceback."""
    if isinstance(err, OSError):
        return err if err.errno in _NO_ROOM else None
    text = str(err)
    for number, words in _NO_ROOM.items():
        if f"os error {number})" in text or words in text:
            return OSError(number, words, str(path))
    return None
