"""Wall time and peak memory per named phase of a training step.

    meter = PhaseMeter(device)
    meter.reset()                  # start of a step
    with meter.phase("rollout"):   # may be entered many times per step
        ...
    meter.results  # {"rollout": {"seconds": 1.2, "peak_bytes": 1.3e9}, ...}

A phase entered several times in one step (once per micro-batch, say) adds up its
seconds and keeps the largest peak; phases are listed in the order first entered.

What the peak means depends on the device:

- CUDA: tensor bytes held by PyTorch's caching allocator
  (`torch.cuda.max_memory_allocated`), reset at phase entry. It includes whatever
  was already allocated when the phase began (weights, optimizer state), and
  excludes the allocator's reserved-but-unused slack and the CUDA context, so
  `nvidia-smi` shows more. The device is synchronized at entry and exit so that
  the seconds are those of the phase's kernels, not of their launches.
- CPU: the peak resident set size of the whole process (Linux `VmHWM` in
  `/proc/self/status`), reset at phase entry by writing "5" to
  `/proc/self/clear_refs`. It counts everything the process holds: Python objects,
  imported libraries, and memory the allocators keep after tensors are freed, so it
  is an upper bound on the tensor bytes. Where the reset is not permitted (not
  Linux, a locked-down /proc) the peak is None: a high-water mark that never
  resets would report the largest phase so far for every later phase. The reset
  is process-wide: the maximum RSS that `getrusage` or `/usr/bin/time -v` report
  afterwards covers only the time since the last phase began.
- Other devices: None.

A phase entered inside another one (nesting) is allowed: before each reset the
peak so far is passed to the phases still open, so the outer phase's peak covers
the inner one's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
# After a working reset VmHWM equals VmRSS; allow for pages touched between the two reads.
_RESET_SLACK_BYTES = 16 * 2**20
_PROBE_BYTES = 64 * 2**20


@dataclass
class _Open:
    """A phase currently entered: its start time and its peak so far."""

    name: str
    started: float
    peak: float | None


class PhaseMeter:
    """Seconds and peak memory of named phases, summed over re-entries within a step."""

    def __init__(self, device: torch.device | str, memory: bool = True) -> None:
        """
        Args:
            device: the device whose memory is measured (`cuda:N`, or `cpu` for the
                process's resident memory).
            memory: also measure peak memory; False records seconds only (peaks are
                None), leaving out the /proc reads and writes a CPU peak costs.
        """
        self.device = torch.device(device)
        self.memory = memory
        self._results: dict[str, dict[str, float | None]] = {}
        self._open: list[_Open] = []
        self._cpu_reset_works: bool | None = None  # probed on first use

    def reset(self) -> None:
        """Forget the figures of the last step (phases still open keep measuring)."""
        self._results = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the block as (part of) phase `name`."""
        self._sync()
        self._share_peak(self._read_peak())
        self._reset_peak()
        self._slot(name)  # listed from its first entry, even if an inner phase ends first
        entry = _Open(name, time.perf_counter(), None)
        self._open.append(entry)
        try:
            yield
        finally:
            self._sync()
            seconds = time.perf_counter() - entry.started
            self._share_peak(self._read_peak())
            self._open.remove(entry)
            self._record(name, seconds, entry.peak)

    @property
    def results(self) -> dict[str, dict[str, float | None]]:
        """{phase: {"seconds": summed, "peak_bytes": max or None}} in first-entry order."""
        return {name: dict(figures) for name, figures in self._results.items()}

    # -- helpers --------------------------------------------------------------------------

    def _slot(self, name: str) -> dict[str, float | None]:
        return self._results.setdefault(name, {"seconds": 0.0, "peak_bytes": None})

    def _record(self, name: str, seconds: float, peak: float | None) -> None:
        figures = self._slot(name)  # again: reset() may have run while the phase was open
        figures["seconds"] += seconds
        if peak is not None:
            old = figures["peak_bytes"]
            figures["peak_bytes"] = peak if old is None else max(old, peak)

    def _share_peak(self, peak: float | None) -> None:
        """Fold the peak since the last reset into every open phase (before a new reset)."""
        if peak is None:
            return
        for entry in self._open:
            entry.peak = peak if entry.peak is None else max(entry.peak, peak)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _reset_peak(self) -> None:
        if not self.memory:
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu" and self._cpu_reset_works is not False:
            self._cpu_reset_works = _clear_cpu_peak(check=self._cpu_reset_works is None)

    def _read_peak(self) -> float | None:
        if not self.memory:
            return None
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device))
        if self.device.type == "cpu" and self._cpu_reset_works:
            hwm, _ = _cpu_memory()
            return float(hwm)
        return None


def _cpu_memory() -> tuple[int, int]:
    """(VmHWM, VmRSS) of this process in bytes."""
    with open(_STATUS) as f:
        status = f.read()
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    if hwm is None or rss is None:
        raise OSError(f"no VmHWM/VmRSS in {_STATUS}")
    return int(hwm.group(1)) * 1024, int(rss.group(1)) * 1024


def _clear_cpu_peak(check: bool) -> bool:
    """Reset the process's VmHWM to its current RSS; False where that is not possible.

    With `check` (the first reset), also confirm that the reset took: raise the
    high-water mark with a short-lived buffer, reset, and see it fall back to the
    current RSS (a kernel that accepts the write but ignores "5" keeps the old mark).
    """
    if check:
        spike = b"\x01" * _PROBE_BYTES  # every page written, returned to the OS on del
        del spike
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        if not check:
            return True
        hwm, rss = _cpu_memory()
    except OSError:
        return False
    return hwm <= rss + _RESET_SLACK_BYTES
