"""Run a function in real processes joined by a gloo process group (CPU), for tests of
anything that reduces across processes."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def run_gloo(fn: Callable[[int], Any], world_size: int = 2, timeout_s: float = 120.0) -> list:
    """`fn(rank)` in `world_size` spawned processes with the default process group set
    up; returns the results by rank. `fn` must be importable (module level) and its
    result picklable. A rank that raises fails the call with that rank's traceback."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, queue))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, ok, value = queue.get(timeout=timeout_s)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [results[rank] for rank in range(world_size)]


def _entry(fn: Callable[[int], Any], rank: int, world_size: int, port: int, queue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        queue.put((rank, True, fn(rank)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_fit(args: list[str], nproc: int = 2, timeout_s: float = 600.0):
    """`pebr fit ARGS` in `nproc` real gloo processes started by torchrun (FSDP2 on CPU),
    one thread each; the finished process, output captured."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        "pebr_lightning.cli",
        "fit",
        *args,
        "--trainer.strategy",
        '{"class_path": "pebr_lightning.parallel.FSDP2Strategy"}',
        "--trainer.devices",
        str(nproc),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
