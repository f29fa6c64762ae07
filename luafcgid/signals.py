"""The self-pipe that wakes the master's loop and each worker's loop for a signal.

Signal handlers do nothing: ``signal.set_wakeup_fd`` writes each signal's number to a
pipe the loop watches, and the loop acts on it between two pieces of its own work, never
in the middle of one (a handler that ran Python could interrupt the loop anywhere).
"""

from __future__ import annotations

import os
import signal
from typing import Iterable, Tuple


def open_signal_pipe(handled: Iterable[int], ignored: Iterable[int] = ()) -> Tuple[int, int]:
    """Route ``handled`` signals to a new non-blocking pipe; ignore ``ignored`` ones.

    Returns (read end, write end). A signal that comes while the pipe is full is dropped
    without a warning: the loop has unread signals and is going to wake anyway.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    for signum in ignored:
        signal.signal(signum, signal.SIG_IGN)
    for signum in handled:
        signal.signal(signum, _wake_only)
        # Restart interrupted system calls: C code in a thread (a Lua C module, a
        # database driver) may not retry EINTR. select() is never restarted, so the
        # loop still wakes.
        signal.siginterrupt(signum, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    return read_fd, write_fd


def wake(write_fd: int) -> None:
    """Wake the loop from another thread: a zero byte, which reads as no signal."""
    try:
        os.write(write_fd, b"\0")
    except BlockingIOError:
        pass  # the pipe is full: the loop is going to wake anyway


def read_signals(read_fd: int, limit: int = 4096) -> bytes:
    """The signal numbers (and wake-up zeros) written since the last read, at most
    ``limit`` of them; b"" when there are none."""
    try:
        return os.read(read_fd, limit)
    except BlockingIOError:
        return b""


def _wake_only(signum: int, frame: object) -> None:
    """Nothing to do here: set_wakeup_fd already wrote the signal to the pipe."""
