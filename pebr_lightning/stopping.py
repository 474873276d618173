"""How a run stops when it is told to: SIGTERM (a scheduler's preemption) ends it
for sure, and never looks like a finished run.

- `sigterm_deadline()`: beside Lightning's own SIGTERM handling (stop at the next
  batch), a timer that ends a run still going after the grace period, and a watchdog
  process for a run stuck where no Python thread can run.
- `stopped(trainer)`: the error (exit 143) of a run stopped before its end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

SIGTERM_GRACE_S = 30.0
"""Seconds a run may take to stop after SIGTERM (PEBR_SIGTERM_GRACE_S overrides)."""

WATCHDOG_MARGIN_S = 5.0
"""Seconds after the grace period before the watchdog process kills a run that not
even its own timer could stop (a C call holding the GIL)."""

# The watchdog: a separate small Python that reads the run's signal numbers from a
# pipe (written by the C-level signal handler, see signal.set_wakeup_fd) and, when a
# SIGTERM stays unanswered for its deadline, says so and kills the run. EOF on the
# pipe means the run ended. It ignores SIGINT and SIGTERM itself: a scheduler that
# signals the whole process group must not stop the watchdog first.
_WATCHDOG = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
deadline, parent = float(sys.argv[1]), int(sys.argv[2])
while True:
    data = os.read(0, 64)
    if not data:
        sys.exit(0)
    if signal.SIGTERM in data:
        break
end = time.monotonic() + deadline
while (left := end - time.monotonic()) > 0:
    if select.select([0], [], [], left)[0] and not os.read(0, 64):
        sys.exit(0)
sys.stderr.write(
    f"error: still running {deadline:.0f} s after SIGTERM, stuck in a call that holds the "
    "interpreter (a reward in a C extension or a regex?); killing it (SIGKILL): "
    "checkpoints written before are complete, resume with --ckpt_path last\n"
)
sys.stderr.flush()
os.kill(parent, signal.SIGKILL)
"""

_WAKEUP_FD = -1
"""The pipe end this process's C signal handler writes to (-1: none)."""


def _forget_wakeup_fd_after_fork() -> None:
    # A forked child (a DataLoader worker) inherits the wakeup fd: its own SIGTERM
    # would otherwise reach the watchdog as the run's.
    global _WAKEUP_FD
    if _WAKEUP_FD != -1:
        _WAKEUP_FD = -1
        with contextlib.suppress(ValueError):  # not the main thread: nothing to undo
            signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_wakeup_fd_after_fork)


@contextlib.contextmanager
def sigterm_deadline():
    """Stop the process for sure once SIGTERM has gone unanswered for the grace period.

    Lightning answers SIGTERM by stopping at the next batch boundary; a call that never
    returns (a hung reward without `timeout_s`, a stuck data read) never reaches one,
    so a scheduler's SIGTERM was ignored. This handler (Lightning calls it beside its
    own) starts a timer; if the process is still running when it fires, it says so and
    exits with 128 + SIGTERM. Checkpoints and outputs are written to a temporary name
    and renamed when complete, so stopping there leaves nothing half-written.

    A call stuck in C while holding the GIL (catastrophic regex backtracking) keeps
    every Python thread, that timer's included, from running; so a watchdog process
    outside the interpreter also hears of the SIGTERM (from the C-level handler) and
    kills the run `WATCHDOG_MARGIN_S` after the grace period if the timer could not.
    """
    global _WAKEUP_FD
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    grace = float(os.environ.get("PEBR_SIGTERM_GRACE_S", SIGTERM_GRACE_S))

    def on_sigterm(signum, frame) -> None:
        signals.received = True

        def stop() -> None:
            print(
                f"error: still running {grace:.0f} s after SIGTERM (a reward or data read "
                "that does not return?); stopping now: checkpoints written before are "
                "complete, resume with --ckpt_path last",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)

        timer = threading.Timer(grace, stop)
        timer.daemon = True
        timer.start()

    watchdog, write_end, previous_fd = _start_watchdog(grace + WATCHDOG_MARGIN_S)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield signals
    finally:
        signal.signal(signal.SIGTERM, previous)
        if watchdog is not None:
            signal.set_wakeup_fd(previous_fd)
            _WAKEUP_FD = previous_fd
            os.close(write_end)
            try:
                watchdog.wait(timeout=10)
            except Exception:
                watchdog.kill()


def _start_watchdog(deadline: float):
    """(the watchdog process, the pipe end the signal handler writes to, the wakeup fd
    it replaced); (None, -1, -1) where one cannot start."""
    global _WAKEUP_FD
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(deadline), str(os.getpid())],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
        )
    except OSError:
        os.close(write_end)
        return None, -1, -1
    finally:
        os.close(read_end)
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    _WAKEUP_FD = write_end
    return watchdog, write_end, previous_fd


@dataclass
class _Signals:
    received: bool = False
    """SIGTERM arrived while the run was going."""


def stopped(trainer: Any):
    """The error a run stopped by SIGTERM before its end exits with (143, not 0)."""
    from pebr_lightning.errors import Stopped

    step = getattr(trainer, "global_step", None)
    at = f" at step {step}" if step is not None else ""
    return Stopped(
        f"stopped by SIGTERM{at}, before the run finished; checkpoints written before "
        "are complete: `--ckpt_path last` resumes a fit, and the same `pebr schedule` "
        "command resumes a schedule"
    )


def finished(trainer: Any) -> bool:
    """Whether a fit reached its max_steps / max_epochs (a SIGTERM after that is moot)."""
    if trainer is None:
        return False
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.global_step >= trainer.max_steps
    return trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs
