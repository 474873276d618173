"""What any engine that serves the policy from another process needs, whatever library
runs there (vLLM today; SGLang or a second vLLM flavour would reuse all of it):

- `WorkerProcess`: a scratch folder named with the trainer's pid (removed on close,
  or by the next engine after the trainer was killed), the worker started with its
  token in the environment (never on the command line), stdin held open so that the
  worker exits with the trainer, a ready line (`<MARKER> <port>`) waited for within a
  deadline, stderr drained and its last lines put into the error when the worker never
  gets ready, and `died()` to tell a dead worker from a slow one;
- `Leader`: several processes (FSDP2) share one worker: rank 0 alone runs the work,
  and every rank gets its result, or the same error, so that none waits forever;
- `write_folder`: weights written beside and renamed, never half a folder.

HTTP (deadline per request, size cap, token) is engines/remote.py.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pebr_lightning.engines.remote import TOKEN_ENV
from pebr_lightning.errors import PebrError


class WorkerProcess:
    """A worker process and the scratch folder it and the trainer share."""

    def __init__(self, prefix: str) -> None:
        """`prefix`: the scratch folder's name prefix, e.g. `pebr-vllm-`; the trainer's
        pid follows it, so a later engine can tell a dead trainer's folders."""
        self.prefix = prefix
        remove_stale_folders(prefix)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
        self.process: subprocess.Popen | None = None

    def start(
        self,
        command: Sequence[str],
        *,
        token: str,
        env: dict[str, str],
        ready: str,
        timeout_s: float,
        what: str,
    ) -> int:
        """Start `command` and return the port its `ready` line names. `env` is added to
        this process's environment, with the token and TMPDIR (the scratch folder's
        `tmp`: the worker's own temporary files go where they are cleaned up). `what`
        names the worker in errors, e.g. `vllm engine: the worker (PATH)`."""
        scratch = self.folder / "tmp"
        scratch.mkdir(exist_ok=True)
        environ = {**os.environ, **env, TOKEN_ENV: token, "TMPDIR": str(scratch)}
        self.process = subprocess.Popen(  # OSError (a mistyped path) is the caller's to word
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
        )
        process = self.process
        port: list[int] = []
        # stderr is drained from the start (a full pipe would stop the worker before it
        # is ready); its last lines go into the error when it never becomes ready
        tail: collections.deque[str] = collections.deque(maxlen=20)
        threading.Thread(target=tail.extend, args=(process.stderr,), daemon=True).start()

        def read() -> None:
            for line in process.stdout:
                if line.startswith(ready):
                    port.append(int(line.split()[1]))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not port:
            code = process.poll()
            self.close()
            why = (
                f"exited with code {code}"
                if code is not None
                else f"not ready in {timeout_s:.0f} s"
            )
            last = "".join(tail).strip()[-1500:]
            raise PebrError(f"{what} {why}; its last output:\n{last}")
        threading.Thread(target=process.stdout.read, daemon=True).start()  # drained too
        return port[0]

    def died(self) -> str | None:
        """'the worker died (exit N)' once the process has ended; None while it runs (or
        when none was started: a worker reached by URL)."""
        if self.process is not None and self.process.poll() is not None:
            return f"the worker died (exit {self.process.returncode})"
        return None

    def close(self) -> None:
        """Kill the worker (if started) and remove the scratch folder; idempotent."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Leader:
    """Rank 0 runs the work for every process of the default group (or just this
    process, when not distributed)."""

    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        self.leader = not self.distributed or dist.get_rank() == 0

    def run(self, work: Callable[[], Any], scatter: bool = False) -> Any:
        """Run `work` on rank 0 only and give every rank its result (`scatter`: rank r
        gets item r of it), or raise its error on every rank. Not distributed: `work()`."""
        if not self.distributed:
            return work()
        world = dist.get_world_size()
        answers: list[Any] = [None] * world
        failure: Exception | None = None
        if self.leader:
            try:
                result = work()
                answers = list(result) if scatter else [result] * world
                answers = [("ok", a) for a in answers]
            except Exception as err:  # every rank raises it below
                failure = err
                why = str(err) if isinstance(err, PebrError) else f"{type(err).__name__}: {err}"
                answers = [("error", why)] * world
        mine: list[Any] = [None]
        dist.scatter_object_list(mine, answers if self.leader else None, src=0)
        kind, value = mine[0]
        if kind == "error":
            raise PebrError(value if self.leader else f"(from rank 0) {value}") from failure
        return value

    def gather(self, items: list[Any]) -> list[list[Any]] | None:
        """Every rank's `items`, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [items]
        parts: list[Any] | None = [None] * dist.get_world_size() if self.leader else None
        dist.gather_object(items, parts, dst=0)
        return parts


def write_folder(target: Path, save: Callable[[Path], None]) -> Path:
    """`save(folder)` into a folder beside `target`, then renamed to it: a reader never
    finds half a folder, and a failed save leaves the previous one in place."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def remove_stale_folders(prefix: str) -> list[Path]:
    """Remove the scratch folders (`<prefix><pid>-*`) of engines whose trainer is gone
    (killed with SIGKILL, it could not): a full-weight run leaves a whole model in each."""
    from pebr_lightning.files import process_alive

    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
